"""P-DARTS (Chen et al., 2019): three stages of deeper networks, candidates pruned between
stages, dropout on the skip connections, at most ``max_skip_connect`` in the normal cell."""

from __future__ import annotations

import math

import torch.nn as nn

from fastnas.search.errors import SearchError
from fastnas.search.methods.base import SearchMethod

# After the warm-up the skip dropout decays as exp(-0.2 * epochs since).
SKIP_DROP_DECAY = 0.2


class PDarts(SearchMethod):
    name = "p-darts"
    summary = "P-DARTS: 3 stages of 5/11/17 cells, candidates pruned 8 -> 5 -> 3 -> 1, skip dropout"
    # 25 epochs in each of three stages, architecture frozen for the first 10.
    defaults = dict(
        epochs=75, batch_size=96, lr=0.025, lr_min=0.0, arch_lr=6e-4, warmup_epochs=10, layers=5,
        skip_drop=(0.0, 0.4, 0.7), max_skip_connect=2,
    )  # fmt: skip
    digits_epochs = 3
    paper_epochs = 75
    spaces = ("darts",)

    def configure(self, values: dict, given: dict) -> None:
        if "stage_layers" not in given:
            layers = values["layers"]
            values["stage_layers"] = (layers, layers + 6, layers + 12)
        if "stage_keep" not in given:
            values["stage_keep"] = (5, 3)

    def scaled_warmup(self, values: dict) -> int:
        """The paper's per-stage warm-up scaled to the epochs of each stage of this run."""
        per_stage = max(1, values["epochs"] // 3)
        return int(round(per_stage * values["warmup_epochs"] / (self.paper_epochs // 3)))

    def validate(self, config) -> None:
        super().validate(config)
        if len(config.stage_layers) != len(config.stage_keep) + 1:
            raise SearchError("p-darts needs one more stage in stage_layers than entries in stage_keep")
        if config.epochs < len(config.stage_layers):
            raise SearchError(f"p-darts needs at least one epoch per stage: --epochs >= {len(config.stage_layers)}")

    def stages(self, config) -> list[dict]:
        n = len(config.stage_layers)
        # Epochs that do not split evenly go to the later, deeper stages.
        epochs = [config.epochs // n + (1 if i >= n - config.epochs % n else 0) for i in range(n)]
        drops = tuple(config.skip_drop) or (0.0,) * n
        return [
            dict(layers=layers, epochs=epochs[i], warmup=min(config.warmup_epochs, epochs[i]), skip_drop=drops[i])
            for i, layers in enumerate(config.stage_layers)
        ]

    def on_epoch(self, net: nn.Module, config, stage: dict, epoch: int) -> dict:
        p, warm = stage["skip_drop"], stage["warmup"]
        if epoch < warm:
            p = p * (stage["epochs"] - epoch - 1) / stage["epochs"]
        else:
            p = p * math.exp(-(epoch - warm) * SKIP_DROP_DECAY)
        net.skip_drop_prob = p
        return {"skip_drop_prob": p}

    def after_stage(self, net: nn.Module, config, stage: int) -> dict | None:
        return prune_candidates(net, config.stage_keep[stage])


def prune_candidates(net: nn.Module, keep: int) -> dict:
    """Each edge's ``keep`` strongest candidates, in their original order (P-DARTS)."""
    weights = net.arch_weights()
    candidates = net.edge_candidates()
    pruned = {}
    for cell, edges in candidates.items():
        pruned[cell] = []
        for e, names in enumerate(edges):
            w = weights[cell][e].tolist()
            # Stable: ties keep the earlier candidate, so pruning is deterministic.
            best = sorted(range(len(names)), key=lambda k: (-w[k], k))[:keep]
            pruned[cell].append([names[k] for k in sorted(best)])
    return pruned
