"""The layer-wise ShuffleNetV2-style space of SPOS (Guo et al., 2020): 20 choice blocks of 4 candidates.

Read from megvii-model/SinglePathOneShot (``src/Supernet/network.py``,
``blocks.py``): a 3x3 stride-2 stem of 16 channels, four stages of 4, 4, 8 and
4 blocks with 64, 160, 320 and 640 channels (the first block of each stage
strides 2), a 1x1 convolution to 1024 channels, global pooling, dropout 0.1 and
a linear classifier without bias. Each block is one of four: ShuffleNetV2
units with a 3x3, 5x5 or 7x7 depthwise convolution, or an Xception-like unit of
three 3x3 depthwise convolutions. A stride-1 unit splits its input's channels
(even and odd) and passes one half through; a stride-2 unit runs a projection
branch (depthwise and 1x1) beside the main one. The supernet's batch norms have
no affine parameters, as the original's.

Here the widths scale with ``C`` (the stem's channels: stages 4C, 10C, 20C and
40C, the last convolution 64C; C=16 is SPOS' network) and the stem strides 2 on
ImageNet-size inputs only (``stem_stride``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fastnas.nn.supernet import SuperNet
from fastnas.spaces.encoding import Encoding
from fastnas.spaces.space import SearchSpace

SHUFFLENET_CHOICES = ["shufflenet_3x3", "shufflenet_5x5", "shufflenet_7x7", "xception"]
STAGE_REPEATS = (4, 4, 8, 4)
STAGE_WIDTHS = (4, 10, 20, 40)  # times C
LAST_WIDTH = 64  # times C
NUM_LAYERS = sum(STAGE_REPEATS)


def channel_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The even and the odd channels of ``x`` (SPOS' ``channel_shuffle``)."""
    return x[:, 0::2], x[:, 1::2]


def _bn(c: int, affine: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, affine=affine)


def _depthwise(c: int, k: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)


def _pointwise(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, bias=False)


class _Unit(nn.Module):
    """A ShuffleNetV2 unit: the main branch on half the channels (stride 1) or on all of them beside a
    projection branch (stride 2), concatenated."""

    def __init__(self, inp: int, oup: int, stride: int, main: nn.Module, k_proj: int, affine: bool):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"a unit strides 1 or 2, got {stride}")
        self.stride = stride
        self.main = main
        if stride == 2:
            self.proj = nn.Sequential(
                _depthwise(inp, k_proj, 2), _bn(inp, affine), _pointwise(inp, inp), _bn(inp, affine), nn.ReLU()
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            keep, x = channel_split(x)
            return torch.cat((keep, self.main(x)), 1)
        return torch.cat((self.proj(x), self.main(x)), 1)


def shuffle_unit(inp: int, oup: int, mid: int, k: int, stride: int, affine: bool) -> _Unit:
    """1x1, depthwise kxk, 1x1 (SPOS ``Shufflenet``); ``inp`` is the main branch's input channels."""
    out = oup - inp
    main = nn.Sequential(
        _pointwise(inp, mid), _bn(mid, affine), nn.ReLU(),
        _depthwise(mid, k, stride), _bn(mid, affine),
        _pointwise(mid, out), _bn(out, affine), nn.ReLU(),
    )  # fmt: skip
    return _Unit(inp, oup, stride, main, k, affine)


def xception_unit(inp: int, oup: int, mid: int, stride: int, affine: bool) -> _Unit:
    """Three (depthwise 3x3, 1x1) pairs (SPOS ``Shuffle_Xception``)."""
    out = oup - inp
    main = nn.Sequential(
        _depthwise(inp, 3, stride), _bn(inp, affine), _pointwise(inp, mid), _bn(mid, affine), nn.ReLU(),
        _depthwise(mid, 3, 1), _bn(mid, affine), _pointwise(mid, mid), _bn(mid, affine), nn.ReLU(),
        _depthwise(mid, 3, 1), _bn(mid, affine), _pointwise(mid, out), _bn(out, affine), nn.ReLU(),
    )  # fmt: skip
    return _Unit(inp, oup, stride, main, 3, affine)


def make_block(choice: str, inp: int, oup: int, stride: int, affine: bool) -> nn.Module:
    """Candidate ``choice`` of a layer from ``inp`` to ``oup`` channels."""
    branch_in = inp if stride == 2 else inp // 2
    mid = oup // 2
    if choice == "xception":
        return xception_unit(branch_in, oup, mid, stride, affine)
    if choice.startswith("shufflenet_"):
        k = int(choice.rsplit("_", 1)[1].split("x")[0])
        return shuffle_unit(branch_in, oup, mid, k, stride, affine)
    raise ValueError(f"unknown ShuffleNet block {choice!r}; choose one of {SHUFFLENET_CHOICES}")


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


class _Skeleton(nn.Module):
    """Stem, the layers' container, last convolution, pooling, dropout, classifier."""

    def _build_ends(self, C: int, num_classes: int, in_channels: int, stem_stride: int, affine: bool) -> None:
        self.first_conv = nn.Sequential(
            nn.Conv2d(in_channels, C, 3, stem_stride, 1, bias=False), _bn(C, affine), nn.ReLU()
        )
        last_in = STAGE_WIDTHS[-1] * C
        self.conv_last = nn.Sequential(_pointwise(last_in, LAST_WIDTH * C), _bn(LAST_WIDTH * C, affine), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(LAST_WIDTH * C, num_classes, bias=False)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv_last(x)).flatten(1)
        return self.classifier(self.dropout(x))


class ShuffleNetSearchNetwork(SuperNet, _Skeleton):
    """The SPOS supernet: each of the 20 layers holds all 4 candidates; a path picks what runs.

    Args:
        C: stem channels (16 in SPOS); the stages have 4C, 10C, 20C, 40C.
        num_classes, in_channels: of the data.
        stem_stride: 2 for ImageNet-size inputs, 1 for small images.
        affine: affine batch norms (False, as SPOS' supernet).

    A path (``set_path``) has one entry per layer; a layer must run at least one
    candidate (several are summed). ``alphas`` (20 x 4) exist only so that the
    network has the parameter groups of every supernet; paths never read them.
    """

    def __init__(
        self, C: int = 16, num_classes: int = 1000, in_channels: int = 3, stem_stride: int = 2, affine: bool = False
    ):
        super().__init__()
        self._build_ends(C, num_classes, in_channels, stem_stride, affine)
        self.layers = nn.ModuleList(
            nn.ModuleList(make_block(choice, i, o, s, affine) for choice in SHUFFLENET_CHOICES)
            for i, o, s in layer_shapes(C)
        )
        self.alphas = nn.Parameter(torch.zeros(NUM_LAYERS, len(SHUFFLENET_CHOICES)))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas]

    def arch_weights(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"layers": torch.softmax(self.alphas, dim=-1).cpu()}

    def choice_candidates(self) -> list[list[str]]:
        return [list(SHUFFLENET_CHOICES) for _ in range(NUM_LAYERS)]

    def choice_nodes(self) -> list[list[int]]:
        return [[i] for i in range(NUM_LAYERS)]

    def encoding(self) -> ShuffleNetEncoding:
        return ShuffleNetEncoding()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is None:
            raise RuntimeError("the ShuffleNet supernet runs a path: call set_path first")
        x = self.first_conv(x)
        for blocks, entry in zip(self.layers, self.path):
            if not entry:
                raise RuntimeError("every ShuffleNet layer must run at least one candidate")
            out = blocks[entry[0]](x)
            for k in entry[1:]:
                out = out + blocks[k](x)
            x = out
        return self._head(x)


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


class ShuffleNetNetwork(_Skeleton):
    """The stand-alone network of one architecture (``{"blocks": [20 names]}``), affine batch norms.

    ``forward`` returns ``(logits, None)``, as the other evaluation networks.
    """

    def __init__(
        self, blocks: Sequence[str], C: int = 16, num_classes: int = 1000, in_channels: int = 3, stem_stride: int = 2
    ):
        super().__init__()
        self.blocks = check_blocks(blocks)
        self._build_ends(C, num_classes, in_channels, stem_stride, True)
        self.layers = nn.Sequential(
            *(make_block(b, i, o, s, True) for b, (i, o, s) in zip(self.blocks, layer_shapes(C)))
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self._head(self.layers(self.first_conv(x))), None

    def has_unused_parameters(self) -> bool:
        return False


# --- the space, for the searchers, fastnas select and fastnas train ------------------------

_NB201_CIFAR = dict(
    auxiliary=False, drop_path_prob=0.0, epochs=200, batch_size=256, lr=0.1, lr_schedule="cosine", lr_min=0.0,
    nesterov=True, weight_decay=5e-4, grad_clip=None, crop_padding=4, flip=True, cutout=0,
)  # fmt: skip

TRAIN_DEFAULTS = {
    # SPOS (megvii-model/SinglePathOneShot src/Evaluation): C=16, batch 1024, SGD 0.5 (momentum 0.9)
    # decayed linearly to 0 over 300,000 iterations (240 epochs), weight decay 4e-5, label smoothing
    # 0.1; random resized crops, colour jitter, flips.
    "imagenet": dict(
        init_channels=16, layers=NUM_LAYERS, auxiliary=False, drop_path_prob=0.0, label_smoothing=0.1,
        epochs=240, batch_size=1024, lr=0.5, lr_schedule="linear", weight_decay=4e-5, grad_clip=None,
        image_size=224, crop_padding=0, flip=True, cutout=0, imagenet_augment=True,
    ),
    # No SPOS recipe for small images: NAS-Bench-201's, whose schedule suits 32x32 images.
    "cifar10": dict(_NB201_CIFAR, init_channels=16, layers=NUM_LAYERS),
    "cifar100": dict(_NB201_CIFAR, init_channels=16, layers=NUM_LAYERS),
    "digits": dict(
        _NB201_CIFAR, init_channels=4, layers=NUM_LAYERS, epochs=30, batch_size=96, image_size=8, crop_padding=1,
        flip=False,
    ),
}  # fmt: skip


def _stem_stride(dataset: str) -> int:
    return 2 if dataset == "imagenet" else 1


class ShuffleNetSpace(SearchSpace):
    """SPOS' layer-wise space: 20 layers of 4 ShuffleNetV2-style candidates; single-path methods only."""

    name = "shufflenet"
    title = "ShuffleNet (SPOS)"
    architecture_noun = "a ShuffleNet architecture"
    train_defaults = TRAIN_DEFAULTS

    def search_layers(self, dataset: str) -> int:
        return NUM_LAYERS

    def validate_search(self, config) -> None:
        from fastnas.errors import SearchError

        super().validate_search(config)
        if config.layers != NUM_LAYERS:
            raise SearchError(f"the ShuffleNet space has {NUM_LAYERS} layers; drop --layers {config.layers}")

    def build_supernet(self, config, num_classes, in_channels, layers, edge_primitives=None):
        if layers != NUM_LAYERS:
            raise ValueError(f"the ShuffleNet space has {NUM_LAYERS} layers; drop --layers {layers}")
        return ShuffleNetSearchNetwork(
            C=config.init_channels, num_classes=num_classes, in_channels=in_channels,
            stem_stride=_stem_stride(config.dataset), affine=config.bn_affine,
        )  # fmt: skip

    def genotype(self, net, config):
        raise ValueError("the ShuffleNet supernet has no architecture weights; fastnas select picks its architecture")

    def to_json(self, genotype) -> dict:
        return {"blocks": list(genotype)}

    def recognises(self, data: dict) -> bool:
        return "blocks" in data

    def from_json(self, data: dict) -> list[str]:
        return check_blocks(data.get("blocks"))

    def describe(self, genotype) -> str:
        return " ".join(genotype)

    def plot(self, genotype, path) -> None:
        raise NotImplementedError("a ShuffleNet architecture is a list of blocks; it has no cell to draw")

    def build_eval_network(self, genotype, config, num_classes, in_channels):
        return ShuffleNetNetwork(genotype, config.init_channels, num_classes, in_channels, _stem_stride(config.dataset))

    def check_train_config(self, config) -> str | None:
        if config.auxiliary:
            return "the ShuffleNet network has no auxiliary head; drop --auxiliary"
        if config.layers != NUM_LAYERS:
            return f"a ShuffleNet architecture has {NUM_LAYERS} layers; drop --layers {config.layers}"
        return None
