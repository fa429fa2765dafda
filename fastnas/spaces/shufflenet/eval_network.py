"""The stand-alone network of one ShuffleNet architecture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fastnas.spaces.shufflenet.blocks import ShuffleNetSkeleton, make_block
from fastnas.spaces.shufflenet.genotype import check_blocks, layer_shapes


class ShuffleNetNetwork(ShuffleNetSkeleton):
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
