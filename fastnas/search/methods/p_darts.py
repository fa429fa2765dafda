"""P-DARTS (Chen et al., 2019): three stages of deeper networks, candidates pruned between
stages, dropout on the skip connections, at most ``max_skip_connect`` in the normal cell.

Checked against the released code (chenxin061/pdarts, ``train_search.py`` and the
search command of its README):

* Stages: 5, 11, 17 cells (``--add_layers 6 --add_layers 12``; ``add_width`` 0,
  the default), 25 epochs each, the architecture frozen for the first 10
  (``eps_no_archs``), 8 -> 5 -> 3 candidates (``num_to_keep``), then 2 at most
  skip-connects in the normal cell.
* Skip dropout: the README's command passes ``--dropout_rate 0.1 0.4 0.7`` (and
  says only "add --cifar100" for CIFAR-100, with the same rates); without them
  ``train_search.py`` drops nothing (``[0.0, 0.0, 0.0]``). The paper's text, as
  summaries of it quote it (its PDF was not at hand), gives 0.0, 0.4, 0.7 on
  CIFAR-10 and 0.1, 0.2, 0.3 on CIFAR-100. The default here is the code's
  command, (0.1, 0.4, 0.7) on every dataset; ``--skip-drop`` takes the paper's.
  Within a stage the rate decays as ``p * (E - e - 1) / E`` during the frozen
  epochs, then ``p * exp(-0.2 * (e - 10))``, as ``train_search.py``; only the
  identity skip-connect is dropped (``Identity`` wrapped in ``nn.Dropout``).
* The architecture's gradient is clipped to norm 5 before Adam's step
  (``nn.utils.clip_grad_norm_(model.module.arch_parameters(), args.grad_clip)``):
  ``arch_grad_clip``, logged with each epoch.
"""

from __future__ import annotations

import math

import torch.nn as nn

from fastnas.errors import SearchError
from fastnas.search.methods.base import SearchMethod

# After the warm-up the skip dropout decays as exp(-0.2 * epochs since).
SKIP_DROP_DECAY = 0.2
# The initial skip dropout of each stage: the released code's search command (see above).
SKIP_DROP = (0.1, 0.4, 0.7)
# The paper's, per dataset, for --skip-drop.
PAPER_SKIP_DROP = {"cifar10": (0.0, 0.4, 0.7), "cifar100": (0.1, 0.2, 0.3)}


class PDarts(SearchMethod):
    name = "p-darts"
    summary = "P-DARTS: 3 stages of 5/11/17 cells, candidates pruned 8 -> 5 -> 3 -> 1, skip dropout"
    # 25 epochs in each of three stages, architecture frozen for the first 10.
    defaults = dict(
        epochs=75, batch_size=96, lr=0.025, lr_min=0.0, arch_lr=6e-4, warmup_epochs=10, layers=5,
        skip_drop=SKIP_DROP, max_skip_connect=2, arch_grad_clip=5.0,
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
        if config.skip_drop and len(config.skip_drop) != len(config.stage_layers):
            raise SearchError(
                f"--skip-drop needs one rate per stage ({len(config.stage_layers)}), got {len(config.skip_drop)}"
            )
        if any(not 0.0 <= p < 1.0 for p in config.skip_drop):
            raise SearchError(f"--skip-drop rates must be in [0, 1), got {tuple(config.skip_drop)}")
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
