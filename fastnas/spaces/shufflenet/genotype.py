"""ShuffleNet architectures: the choices, the layers' shapes, an architecture's genes and its check.

The bottom of the ShuffleNet space.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastnas.spaces.encoding import Encoding

SHUFFLENET_CHOICES = ["shufflenet_3x3", "shufflenet_5x5", "shufflenet_7x7", "xception"]
STAGE_REPEATS = (4, 4, 8, 4)
STAGE_WIDTHS = (4, 10, 20, 40)  # times C
LAST_WIDTH = 64  # times C
NUM_LAYERS = sum(STAGE_REPEATS)


def layer_shapes(C: int) -> list[tuple[int, int, int]]:
    """(input channels, output channels, stride) of each of the 20 layers."""
    if C < 2 or C % 2:
        raise ValueError(f"C must be an even number of at least 2, got {C}")
    shapes, c_in = [], C
    for repeats, width in zip(STAGE_REPEATS, STAGE_WIDTHS):
        c_out = width * C
        for i in range(repeats):
            shapes.append((c_in, c_out, 2 if i == 0 else 1))
            c_in = c_out
    return shapes


class ShuffleNetEncoding(Encoding):
    """A ShuffleNet architecture as 20 genes, the candidate of each layer."""

    space = "shufflenet"

    def __init__(self):
        super().__init__([len(SHUFFLENET_CHOICES)] * NUM_LAYERS)

    def to_path(self, genes):
        return tuple((g,) for g in self.check(genes))

    def to_json(self, genes) -> dict:
        return {"blocks": [SHUFFLENET_CHOICES[g] for g in self.check(genes)]}

    def from_json(self, data: dict):
        return tuple(SHUFFLENET_CHOICES.index(b) for b in check_blocks(data.get("blocks")))

    def describe(self, genes) -> str:
        return " ".join(SHUFFLENET_CHOICES[g] for g in self.check(genes))


def check_blocks(blocks) -> list[str]:
    """The 20 block names of a ShuffleNet architecture; ValueError otherwise."""
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or len(blocks) != NUM_LAYERS:
        raise ValueError(f"a ShuffleNet architecture lists {NUM_LAYERS} blocks, got {blocks!r}")
    unknown = sorted({str(b) for b in blocks if b not in SHUFFLENET_CHOICES})
    if unknown:
        raise ValueError(f"unknown ShuffleNet blocks {unknown}; choose from {SHUFFLENET_CHOICES}")
    return list(blocks)
