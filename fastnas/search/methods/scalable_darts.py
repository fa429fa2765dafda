"""Scalable-DARTS (Wang et al., 2019): a large operator set factorised as activation x operator,
each factor with its own architecture parameters, optimised one after the other."""

from __future__ import annotations

import torch.nn as nn

from fastnas.errors import SearchError
from fastnas.search.methods.base import SearchMethod


class ScalableDarts(SearchMethod):
    name = "scalable-darts"
    summary = "Scalable-DARTS: operators x activations, one softmax factor each, the factors stepped in turn"
    # DARTS' first-order settings over the factorised space.
    defaults = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4)
    spaces = ("darts",)
    searches_activations = True
    cuda_graph_unsupported = "Scalable-DARTS' two architecture steps per step have not been verified under capture"

    def configure(self, values: dict, given: dict) -> None:
        from fastnas.spaces.darts.factorized import SCALABLE_ACTIVATIONS

        if values.get("activations") is None:
            values["activations"] = SCALABLE_ACTIVATIONS

    def validate(self, config) -> None:
        from fastnas.spaces.darts.factorized import check_activations

        super().validate(config)
        try:
            check_activations(config.activations)
        except (TypeError, ValueError) as exc:
            raise SearchError(f"--activations: {exc}") from None
        if config.partial_channels or config.edge_normalization:
            raise SearchError("scalable-darts searches full edges; drop --partial-channels")
        if config.unrolled:
            raise SearchError("scalable-darts takes first-order steps of its factors; it does not unroll")

    def arch_groups(self, net: nn.Module) -> list[list[nn.Parameter]]:
        # The operator factor steps first; the activation factor's gradient is then taken
        # at the operators' new weights, so similar (operator, activation) pairs never
        # compete within one softmax.
        return net.factor_groups()
