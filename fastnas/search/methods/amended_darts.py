"""Amended-DARTS (Bi et al., 2019): the architecture gradient amended by a second-order term
whose error from the true gradient stays bounded."""

from __future__ import annotations

from fastnas.errors import SearchError
from fastnas.search.methods.base import SearchMethod


class AmendedDarts(SearchMethod):
    name = "amended-darts"
    summary = "Amended-DARTS: dL_val/da - eta * d2L_train/dadw . H . dL_val/dw, by finite differences"
    defaults = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4)
    own_options = ("amend_coefficient",)
    cuda_graph_unsupported = (
        "Amended-DARTS' four finite-difference passes per step (shifted weights under functional_call) have not "
        "been verified under capture"
    )

    def validate(self, config) -> None:
        super().validate(config)
        if config.unrolled:
            raise SearchError("amended-darts takes the amended gradient at the current weights; it does not unroll")
        if not config.amend_coefficient >= 0:
            raise SearchError(f"--amend-coefficient must be >= 0, got {config.amend_coefficient}")

    def arch_gradient(self, searcher, net):
        from fastnas.search.architect import AmendedArchGrad

        return AmendedArchGrad(net, searcher.config.amend_coefficient, searcher.dist)
