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

import torch
import torch.nn as nn

from fastnas.nn.supernet import SuperNet
from fastnas.spaces.shufflenet.blocks import ShuffleNetSkeleton, make_block
from fastnas.spaces.shufflenet.genotype import NUM_LAYERS, SHUFFLENET_CHOICES, ShuffleNetEncoding, layer_shapes


class ShuffleNetSearchNetwork(SuperNet, ShuffleNetSkeleton):
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
