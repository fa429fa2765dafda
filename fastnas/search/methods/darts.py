"""DARTS (Liu et al., 2019): first order, and the unrolled second order.

The base ``SearchMethod`` is DARTS' own loop; these two set the paper's settings.
"""

from __future__ import annotations

from fastnas.search.methods.base import SearchMethod
from fastnas.search.methods.pc_darts import IMAGENET_RECIPE, apply_imagenet_recipe

# fastnas' own ImageNet recipe for the full DARTS space; no paper ran it. DARTS searched on
# CIFAR-10 only and moved the cell to ImageNet, since a supernet of all 8 candidates on every
# channel at 224x224 did not fit the GPU memory of the time; PC-DARTS (this recipe's source:
# PC-DARTS' ImageNet settings, methods/pc_darts.py) sent half the channels through the
# candidates to fit. With ``memory="recompute"`` an edge keeps nothing of its candidates
# for backward, so the whole supernet, every channel through every candidate (K = 1, no
# edge normalisation), trains at PC-DARTS' batch, schedule and subsets.
DARTS_IMAGENET_RECIPE = {**IMAGENET_RECIPE, "partial_channels": None, "memory": "recompute"}


class Darts(SearchMethod):
    name = "darts"
    summary = "DARTS, first order: the architecture gradient at the current weights"
    defaults = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4)

    def configure(self, values: dict, given: dict) -> None:
        if values["dataset"] == "imagenet":
            apply_imagenet_recipe(values, given, DARTS_IMAGENET_RECIPE)


class DartsSecondOrder(SearchMethod):
    name = "darts-2nd"
    summary = "DARTS, second order: unrolled one virtual weight step, finite-difference Hessian-vector product"
    defaults = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4, unrolled=True)
