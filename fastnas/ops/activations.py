"""The activations a depthwise prologue can apply, by name, with their reference math.

ReLU is what DARTS puts before every convolution; Scalable-DARTS (Wang et al.,
2019) searches the activation too. The codes are the kernels' encoding
(``csrc/fastnas_math.h``, ``kernels/multi_depthwise.py``): a name's code is its
position here. ELU and leaky ReLU take PyTorch's defaults (alpha 1, slope 0.01),
swish is SiLU (x * sigmoid(x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "relu6", "elu", "leaky_relu", "swish", "hardswish")
ELU_ALPHA = 1.0
LEAKY_RELU_SLOPE = 0.01


def activation_code(name: str) -> int:
    """The kernels' code of activation ``name``; ValueError naming the known ones otherwise."""
    try:
        return ACTIVATIONS.index(name)
    except ValueError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


def apply_activation(name: str, pre: torch.Tensor) -> torch.Tensor:
    """``name`` applied to ``pre``, the eager way (the oracle of the kernels' prologue)."""
    if name == "relu":
        return torch.relu(pre)
    if name == "relu6":
        return F.relu6(pre)
    if name == "elu":
        return F.elu(pre, alpha=ELU_ALPHA)
    if name == "leaky_relu":
        return F.leaky_relu(pre, LEAKY_RELU_SLOPE)
    if name == "swish":
        return F.silu(pre)
    if name == "hardswish":
        return F.hardswish(pre)
    activation_code(name)  # raises for an unknown name
    raise AssertionError(name)


__all__ = ["ACTIVATIONS", "activation_code", "apply_activation"]
