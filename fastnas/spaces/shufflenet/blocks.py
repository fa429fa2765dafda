"""The ShuffleNetV2 and Xception-like units and the network skeleton both ShuffleNet networks share."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastnas.spaces.shufflenet.genotype import LAST_WIDTH, SHUFFLENET_CHOICES, STAGE_WIDTHS


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


class ShuffleNetSkeleton(nn.Module):
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
