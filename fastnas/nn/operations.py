"""Candidate operations of the DARTS and NAS-Bench-201 search spaces.

Definitions follow DARTS (Liu et al., 2019, ``cnn/operations.py``) and
NAS-Bench-201 (Dong and Yang, 2020). ``OPS`` maps a primitive's name to a
factory ``(C, stride, affine) -> nn.Module``; the candidate set of a search
space is a list of these names, so new primitives only need
``register_primitive``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

OpFactory = Callable[[int, int, bool], nn.Module]


class ReLUConvBN(nn.Module):
    """ReLU, convolution, batch norm (DARTS preprocessing; NAS-Bench-201 ``nor_conv``)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, dilated depthwise convolution, 1x1 convolution, batch norm."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int, affine: bool = True
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C_in, bias=False
            ),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked (ReLU, depthwise, 1x1, batch norm) blocks; only the first strides."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine=affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Identity(nn.Module):
    """skip_connect on a stride-1 edge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The ``none`` candidate: zeros of the edge's output shape.

    Multiplying by zero (rather than returning a fresh zeros tensor) keeps the
    output in the autograd graph, so a cell whose only candidates are ``none``
    still back-propagates (zero) gradients instead of failing.
    """

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset 1x1 stride-2 convolutions, concatenated."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got C_out={C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
    "nor_conv_1x1": lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine=affine),
    "nor_conv_3x3": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine=affine),
}


def register_primitive(name: str, factory: OpFactory, *, overwrite: bool = False) -> None:
    """Add a candidate operation ``factory(C, stride, affine) -> nn.Module`` under ``name``.

    The module must map (N, C, H, W) to (N, C, H / stride, W / stride).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a primitive name must be a non-empty string, got {name!r}")
    if name in OPS and not overwrite:
        raise ValueError(f"primitive {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(factory):
        raise TypeError(f"the factory for primitive {name!r} must be callable, got {type(factory).__name__}")
    OPS[name] = factory


def check_primitives(primitives, where: str = "primitives") -> list[str]:
    """Return ``primitives`` as a list after checking every name is registered."""
    if isinstance(primitives, str):
        raise TypeError(f"{where} must be a list of primitive names, not the string {primitives!r}")
    names = list(primitives)
    if not names:
        raise ValueError(f"{where} is empty; an edge needs at least one candidate")
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(
            f"{where}: unknown primitive(s) {unknown}; registered: {sorted(OPS)} (add more with register_primitive)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{where} lists a primitive twice: {names}")
    return names
