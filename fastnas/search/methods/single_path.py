"""What single-path and one-shot supernet training share: paths instead of architecture weights.

These methods (SPOS, FairNAS, Bender et al.'s one-shot model) train no
architecture parameters. Each step runs one or more *paths* of the supernet
(``SuperNet.set_path``): only the candidates a path names run, through the
fused engine where it can compute them, and only they get gradients. A
parameter that ran in no pass of a step keeps ``grad=None``, and SGD skips
such a parameter altogether (no momentum, no weight decay), which is what
SPOS does by setting the gradients of unsampled blocks to None.

The search then writes a trained supernet, not a genotype: ``fastnas select``
searches over it.

The step is ``passes`` (what to run: a slice of the batch, a path and the
weight of its loss), then one update. Paths are drawn from a generator seeded,
once per epoch, from the run's torch generator, which checkpoints save: every
rank draws the same paths, and a resumed run draws what an uninterrupted one
would.

Shared settings (``SearchConfig``): ``warmup_epochs`` (Yu et al.'s warm-up:
the first epochs train every candidate at once, before any sampling),
``path_dropout`` (each candidate of a path dropped with a probability that
rises linearly from 0 over the epochs; a node never loses all of its inputs),
``bn_affine`` and ``bn_track`` (batch norms of the candidates with affine
parameters; running statistics or batch statistics), ``label_smoothing`` (of the
training loss, as Yu et al.'s ``CrossEntropyLabelSmooth``: ``F.cross_entropy``'s
targets ``(1 - e) * onehot + e / classes``; the validation loss stays plain).
"""

from __future__ import annotations

import contextlib
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnas.errors import SearchError
from fastnas.run.loop import weight_sgd
from fastnas.search.methods.base import SearchMethod

Path = tuple[tuple[int, ...], ...]


# --- paths --------------------------------------------------------------------------


def active_candidates(net: nn.Module) -> list[tuple[int, ...]]:
    """Every candidate of every choice block that computes something (all but ``none``)."""
    return [tuple(k for k, name in enumerate(names) if name != "none") for names in net.choice_candidates()]


def full_path(net: nn.Module) -> Path:
    """Every candidate of every choice block at once (the one-shot model; Yu et al.'s warm-up)."""
    return tuple(active_candidates(net))


def fair_paths(sizes, rng: random.Random) -> list[Path]:
    """FairNAS' strict fairness: m paths, each choice block's m candidates in a random order,
    so that every candidate of every block is in exactly one of them."""
    m = set(sizes)
    if len(m) != 1:
        raise SearchError(f"strict fairness needs the same number of candidates in every choice block, got {sorted(m)}")
    m = m.pop()
    orders = [rng.sample(range(m), m) for _ in sizes]
    return [tuple((order[i],) for order in orders) for i in range(m)]


def drop_paths(path: Path, nodes, probabilities, zero, rng: random.Random) -> Path:
    """``path`` with each of its candidates dropped independently, with the probability of its node.

    A node whose every candidate was dropped keeps one of them, drawn uniformly
    (FractalNet's local rule), so that no node of a cell and no layer goes dark.
    ``zero[b]`` is the set of candidates of block b that compute nothing (``none``);
    they are never counted.
    """
    out = [tuple(k for k in entry if k not in zero[b]) for b, entry in enumerate(path)]
    for node, p in zip(nodes, probabilities):
        if p <= 0:
            continue
        before = [(b, k) for b in node for k in out[b]]
        if not before:
            continue
        kept = [(b, k) for b, k in before if rng.random() >= p]
        if not kept:
            kept = [before[rng.randrange(len(before))]]
        for b in node:
            out[b] = tuple(k for bb, k in kept if bb == b)
    return tuple(out)


def zero_candidates(net: nn.Module) -> list[set[int]]:
    return [{k for k, name in enumerate(names) if name == "none"} for names in net.choice_candidates()]


class PathContext:
    """What a step needs to draw its paths: the network's structure, the epoch's generator and schedules."""

    def __init__(self, searcher, net: nn.Module, train_arch: bool):
        self.config = searcher.config
        self.net = net
        self.encoding = net.encoding()
        self.sizes = net.choice_sizes()
        self.nodes = net.choice_nodes()
        self.zero = zero_candidates(net)
        self.full = full_path(net)
        self.warmup = not train_arch
        # Drawn from the run's generator, whose state the checkpoints keep.
        self.rng = random.Random(int(torch.randint(2**62, (1,)).item()))
        self.drop = float(getattr(net, "path_dropout_prob", 0.0))
        self.sampler = searcher_sampler(searcher, self.encoding)

    def dropped(self, path: Path, probabilities=None) -> Path:
        if probabilities is None:
            probabilities = [self.drop] * len(self.nodes)
        if not any(p > 0 for p in probabilities):
            return path
        return drop_paths(path, self.nodes, probabilities, self.zero, self.rng)


def searcher_sampler(searcher, encoding):
    """The architecture sampler of a search: uniform, or uniform under its constraint."""
    from fastnas.search.sampling import ArchitectureSampler

    return ArchitectureSampler.for_search(searcher.config, encoding, searcher.info)


# --- the methods' base ------------------------------------------------------------------


class SinglePathMethod(SearchMethod):
    """A method that trains a supernet by paths; subclasses define ``passes``."""

    trains_architecture = False
    uses_validation_batches = False
    spaces = ("darts", "nb201", "shufflenet")
    # Different paths leave different parameters without gradients from step to step.
    ddp_find_unused_parameters = True
    cuda_graph_unsupported = (
        "single-path and one-shot methods draw their paths on the host at every step, which changes "
        "the kernels from step to step"
    )
    #: No weight decay on batch-norm parameters and biases (SPOS' parameter groups).
    decay_1d = False
    #: How the weights' learning rate falls from ``lr`` to ``lr_min`` over a stage's epochs:
    #: "cosine" (DARTS'), or "linear" (SPOS' ``LambdaLR(1 - step / total_iters)``, here per epoch).
    lr_schedule = "cosine"

    def validate(self, config) -> None:
        super().validate(config)
        if config.partial_channels:
            raise SearchError(f"{self.name} trains whole edges; drop --partial-channels")
        if config.edge_normalization:
            raise SearchError(f"{self.name} has no edge weights; edge normalisation does not apply")
        if not 0.0 <= config.path_dropout < 1.0:
            raise SearchError(f"--path-dropout must be in [0, 1), got {config.path_dropout}")
        if not 0.0 <= config.label_smoothing < 1.0:
            raise SearchError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")

    def make_optimizers(self, searcher, net: nn.Module, stage: dict) -> dict:
        parts = super().make_optimizers(searcher, net, stage)
        if self.decay_1d:
            return parts
        cfg = searcher.config
        decay = [p for p in net.weight_parameters() if p.dim() > 1]
        no_decay = [p for p in net.weight_parameters() if p.dim() <= 1]
        w_opt = weight_sgd(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        parts["w_opt"] = w_opt
        parts["sched"] = self.lr_scheduler(w_opt, cfg, stage["epochs"])
        return parts

    def lr_scheduler(self, w_opt, cfg, epochs: int):
        """The per-epoch schedule of the weights' learning rate (``lr_schedule``)."""
        if self.lr_schedule == "linear" and cfg.lr > 0:
            # LinearLR rather than a LambdaLR: a checkpoint's cosine state loads into it too.
            end = min(1.0, max(0.0, cfg.lr_min / cfg.lr))
            return torch.optim.lr_scheduler.LinearLR(w_opt, start_factor=1.0, end_factor=end, total_iters=epochs)
        return torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=epochs, eta_min=cfg.lr_min)

    def on_epoch(self, net: nn.Module, config, stage: dict, epoch: int) -> dict:
        # Rises linearly from 0 over the stage; the last epoch runs at (E - 1) / E of the setting.
        net.path_dropout_prob = config.path_dropout * epoch / stage["epochs"]
        return {"path_dropout": net.path_dropout_prob, "warmup": epoch < stage["warmup"]}

    def before_evaluation(self, net: nn.Module, config) -> None:
        """The epoch's validation runs one fixed architecture (drawn from the seed), without recalibration."""
        encoding = net.encoding()
        net.set_path(encoding.to_path(encoding.sample(random.Random(config.seed))))

    def passes(self, ctx: PathContext, batch_size: int) -> list[tuple[slice, Path, float]]:
        """What one step runs: (part of the batch, path, weight of its mean loss) per forward pass."""
        raise NotImplementedError

    def make_step(self, searcher, model, net, parts, train_arch, lr):
        ctx = PathContext(searcher, net, train_arch)
        cfg = searcher.config
        w_opt, scaler = parts["w_opt"], parts["w_scaler"]
        distributed = model is not net

        def step(xt, yt, xv=None, yv=None):
            passes = [(slice(None), ctx.full, 1.0)] if ctx.warmup else self.passes(ctx, len(yt))
            w_opt.zero_grad(set_to_none=True)
            loss_sum = correct_sum = xt.new_zeros((), dtype=torch.float32)
            images = 0
            for i, (part, path, weight) in enumerate(passes):
                net.set_path(path)
                x, y = xt[part], yt[part]
                last = i == len(passes) - 1
                sync = contextlib.nullcontext() if (last or not distributed) else model.no_sync()
                with sync:
                    with searcher._autocast():
                        logits = model(x)
                        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    scaler.scale(loss * weight).backward()
                loss_sum = loss_sum + loss.detach().float() * len(y)
                correct_sum = correct_sum + (logits.detach().argmax(1) == y).sum().float()
                images += len(y)
            scaler.unscale_(w_opt)
            nn.utils.clip_grad_norm_(net.weight_parameters(), cfg.grad_clip)
            scaler.step(w_opt)
            scaler.update()
            parts["a_opt"].zero_grad(set_to_none=True)
            zero = torch.zeros_like(loss_sum)
            # Per image of the batch: FairNAS' m passes over one batch count as their mean.
            return torch.stack([loss_sum / images, correct_sum * len(yt) / images, zero, zero])

        return step
