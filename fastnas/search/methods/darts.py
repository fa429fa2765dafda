"""DARTS (Liu et al., 2019): first order, and the unrolled second order.

The base ``SearchMethod`` is DARTS' own loop; these two set the paper's settings.
"""

from __future__ import annotations

from fastnas.search.methods.base import SearchMethod


class Darts(SearchMethod):
    name = "darts"
    summary = "DARTS, first order: the architecture gradient at the current weights"
    defaults = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4)


class DartsSecondOrder(SearchMethod):
    name = "darts-2nd"
    summary = "DARTS, second order: unrolled one virtual weight step, finite-difference Hessian-vector product"
    defaults = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4, unrolled=True)
