"""The one-shot model of Bender et al. (ICML 2018): every candidate active, incoming paths dropped.

Each step splits the batch into ghost batches (``ghost_batch_size``), each
normalised by its own batch statistics and run with a path dropout mask of its
own; the dropped candidates are not computed. A candidate feeding a node of k
incoming paths (its edges' candidates other than ``none``) is dropped with
probability ``t / T * r ** (1 / k)`` at epoch t of T, so that all k go at once
with probability r at the end (``path_dropout`` is r); a node that lost every
input keeps one. Weight decay (L2) reaches only what ran: a parameter of a
candidate that every ghost batch dropped has no gradient, and SGD leaves it
alone. Batch norms use batch statistics in training and evaluation alike
(``bn_track`` off), as the paper evaluates its one-shot model.

What is and is not checked against the paper (Bender et al., "Understanding and
Simplifying One-Shot Architecture Search", ICML 2018, PMLR 80:550-559): only its
abstract (in the project's seed list) and the opening of its text (introduction) could
be read here; its method section (Sec. 3, the one-shot model's training) was not
found in the reference stores searched (pages, docs, code). So each of these is
this project's reading of the paper's published description, unconfirmed
against its text:

* the drop probability per candidate, ``r ** (1 / k)`` for a node of k incoming
  candidates, so that all k go with probability r;
* the schedule: the rate rises linearly from 0 over training (here ``t / T`` at
  epoch t of T, applied to the per-candidate probability);
* a node that lost every input keeps one (FractalNet's local rule); the paper's
  rule for this case is not confirmed;
* ghost batch normalisation and L2 only on the parts that ran, as above;
* the values: r = 0.1 and ghost batches of 32 (16 on the digits) are this
  project's defaults, not numbers taken from the paper; ``--path-dropout`` and
  ``--ghost-batch-size`` set others.
"""

from __future__ import annotations

from fastnas.errors import SearchError
from fastnas.search.methods.single_path import PathContext, SinglePathMethod, active_candidates


class OneShot(SinglePathMethod):
    name = "oneshot"
    summary = "Bender et al.'s one-shot model: all candidates, scheduled path dropout, ghost batch norm"
    defaults = dict(
        epochs=100, batch_size=256, lr=0.1, lr_min=0.0, weight_decay=1e-4, train_portion=0.8, path_dropout=0.1,
        ghost_batch_size=32, bn_track=False,
    )  # fmt: skip
    digits_epochs = 30
    decay_1d = True

    def validate(self, config) -> None:
        super().validate(config)
        if config.ghost_batch_size is not None and config.ghost_batch_size < 2:
            raise SearchError(f"--ghost-batch-size must be at least 2, got {config.ghost_batch_size}")

    def configure(self, values: dict, given: dict) -> None:
        if values["dataset"] == "digits" and "ghost_batch_size" not in given:
            values["ghost_batch_size"] = 16

    def on_epoch(self, net, config, stage: dict, epoch: int) -> dict:
        record = super().on_epoch(net, config, stage, epoch)
        # The rate is per node (``passes``); the network carries the schedule's fraction.
        net.path_dropout_prob = 0.0
        net.path_dropout_schedule = epoch / stage["epochs"]
        record["path_dropout"] = config.path_dropout * net.path_dropout_schedule
        return record

    def passes(self, ctx: PathContext, batch_size: int):
        r = ctx.config.path_dropout
        active = active_candidates(ctx.net)
        fraction = float(getattr(ctx.net, "path_dropout_schedule", 0.0))
        probabilities = []
        for node in ctx.nodes:
            k = sum(len(active[b]) for b in node)
            probabilities.append(fraction * r ** (1.0 / k) if k and r > 0 else 0.0)
        ghost = ctx.config.ghost_batch_size or batch_size
        passes = []
        for start in range(0, batch_size, ghost):
            stop = min(batch_size, start + ghost)
            if stop - start < 2 and passes:
                # A ghost batch of one image cannot be normalised; it joins the previous one.
                part, path, _ = passes[-1]
                passes[-1] = (slice(part.start, stop), path, (stop - part.start) / batch_size)
                continue
            passes.append((slice(start, stop), ctx.dropped(ctx.full, probabilities), (stop - start) / batch_size))
        return passes
