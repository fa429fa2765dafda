"""FairNAS (Chu et al., 2021): strict fairness. Each step draws m paths, every choice block's m
candidates in a random order, so that every candidate of every block is trained exactly once, on
the same batch; their gradients are summed and applied in one update.

Checked against the paper (Algorithm 1) and Yu et al.'s re-implementation
(kcyu2014/nas-landmarkreg, ``fairnas_procedure.py``: the m losses back-propagated
one after another into the same gradients, then one clipped SGD step). The
repository xiaomi-automl/FairNAS ships the searched models only. Every choice
block must offer the same m candidates (on the DARTS space each edge's 8,
``none`` included, so those paths are per-edge choices rather than two-input
genotypes; a genotype is the path whose other edges are ``none``).
"""

from __future__ import annotations

from fastnas.search.methods.single_path import PathContext, SinglePathMethod, fair_paths


class FairNAS(SinglePathMethod):
    name = "fairnas"
    summary = "FairNAS: per step m paths covering every candidate once, gradients summed, one update"
    defaults = dict(epochs=150, batch_size=256, lr=0.045, lr_min=0.0, weight_decay=4e-5, train_portion=0.8)
    digits_epochs = 30

    def validate(self, config) -> None:
        super().validate(config)

    def configure(self, values: dict, given: dict) -> None:
        if values["dataset"] == "digits" and "lr" not in given:
            values["lr"] = 0.05

    def passes(self, ctx: PathContext, batch_size: int):
        return [(slice(None), ctx.dropped(path), 1.0) for path in fair_paths(ctx.sizes, ctx.rng)]
