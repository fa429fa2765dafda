"""Candidate operations of the DARTS and NAS-Bench-201 search spaces.

Definitions follow DARTS (Liu et al., 2019, ``cnn/operations.py``) and
NAS-Bench-201 (Dong and Yang, 2020). ``OPS`` maps a primitive's name to a
factory ``(C, stride, affine) -> nn.Module``; the candidate set of a search
space is a list of these names, so new primitives only need
``register_primitive``.

The convolution candidates also come with another activation in place of their
ReLUs (Scalable-DARTS, Wang et al., 2019), named ``<primitive>_<activation>``:
``sep_conv_3x3_relu6``, ``dil_conv_5x5_swish`` (``with_activation``,
``split_activation``); the plain name is the ReLU one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from fastnas.ops.activations import ACTIVATIONS, ELU_ALPHA, LEAKY_RELU_SLOPE

OpFactory = Callable[[int, int, bool], nn.Module]

# The module of each activation of fastnas.ops.activations, with the parameters the kernels take.
ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "relu6": lambda: nn.ReLU6(inplace=False),
    "elu": lambda: nn.ELU(alpha=ELU_ALPHA),
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE),
    "swish": lambda: nn.SiLU(),
    "hardswish": lambda: nn.Hardswish(),
}
assert tuple(ACTIVATION_MODULES) == ACTIVATIONS


def activation_module(name: str) -> nn.Module:
    """A fresh module of activation ``name``."""
    if name not in ACTIVATION_MODULES:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATION_MODULES[name]()


def activation_name(m: nn.Module) -> str | None:
    """The name of activation module ``m`` when it is one of ``ACTIVATION_MODULES`` with
    their parameters (ELU alpha, leaky ReLU slope), else None."""
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.ReLU6):
        return "relu6"
    if isinstance(m, nn.ELU) and m.alpha == ELU_ALPHA:
        return "elu"
    if isinstance(m, nn.LeakyReLU) and m.negative_slope == LEAKY_RELU_SLOPE:
        return "leaky_relu"
    if isinstance(m, nn.SiLU):
        return "swish"
    if isinstance(m, nn.Hardswish):
        return "hardswish"
    return None


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob``, scaling the rest by 1 / (1 - drop_prob).

    One Bernoulli draw per sample (DARTS ``utils.drop_path``), from the global
    generator of ``x``'s device, so a run's random state captures it.
    """
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class ReLUConvBN(nn.Module):
    """ReLU, convolution, batch norm (DARTS preprocessing; NAS-Bench-201 ``nor_conv``)."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        affine: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        self.op = nn.Sequential(
            activation_module(activation),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU (or ``activation``), dilated depthwise convolution, 1x1 convolution, batch norm."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        self.op = nn.Sequential(
            activation_module(activation),
            nn.Conv2d(
                C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C_in, bias=False
            ),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked (ReLU or ``activation``, depthwise, 1x1, batch norm) blocks; only the first strides."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        affine: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        self.op = nn.Sequential(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine=affine, activation=activation),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine=affine, activation=activation),
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


def _conv_factories(activation: str) -> dict[str, OpFactory]:
    """The convolution candidates with ``activation`` in place of their ReLUs, by primitive name."""
    a = activation
    return {
        "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine, activation=a),
        "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine, activation=a),
        "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine, activation=a),
        "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine, activation=a),
        "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine, activation=a),
        "nor_conv_1x1": lambda C, stride, affine: ReLUConvBN(C, C, 1, stride, 0, affine=affine, activation=a),
        "nor_conv_3x3": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine=affine, activation=a),
    }


# The candidates that begin with an activation, and so also come with the others.
CONV_PRIMITIVES = tuple(_conv_factories("relu"))

OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    **_conv_factories("relu"),
}


def with_activation(primitive: str, activation: str) -> str:
    """The name of convolution ``primitive`` with ``activation`` in place of ReLU (the plain name for ReLU)."""
    if activation not in ACTIVATION_MODULES:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if activation == "relu":
        return primitive
    if primitive not in CONV_PRIMITIVES:
        raise ValueError(f"{primitive!r} has no activation to choose; those that do: {', '.join(CONV_PRIMITIVES)}")
    return f"{primitive}_{activation}"


def split_activation(name: str) -> tuple[str, str | None]:
    """(primitive, activation) of a candidate name: ``sep_conv_3x3_relu6`` -> (sep_conv_3x3, relu6),
    ``sep_conv_3x3`` -> (sep_conv_3x3, relu); (name, None) for a candidate without an activation."""
    for activation in sorted(ACTIVATIONS, key=len, reverse=True):
        base = name[: -len(activation) - 1]
        if name.endswith("_" + activation) and base in CONV_PRIMITIVES and activation != "relu":
            return base, activation
    return (name, "relu") if name in CONV_PRIMITIVES else (name, None)


for _activation in ACTIVATIONS[1:]:
    OPS.update({with_activation(p, _activation): f for p, f in _conv_factories(_activation).items()})


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
