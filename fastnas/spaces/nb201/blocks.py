"""The residual block between NAS-Bench-201 stages, in both its search and stand-alone networks."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastnas.nn.operations import ReLUConvBN


class ResNetBasicBlock(nn.Module):
    """The residual reduction block between NAS-Bench-201 stages (stride 2)."""

    def __init__(self, C_in: int, C_out: int, stride: int = 2):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine=True)
        if stride == 2:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(C_in, C_out, 1, bias=False))
        elif C_in != C_out:
            self.downsample = ReLUConvBN(C_in, C_out, 1, 1, 0, affine=True)
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))
