"""The search loop shared by DARTS, DARTS second order, PC-DARTS, P-DARTS and GDAS.

The methods differ in the network they search (partial channels, edge
normalisation, candidate subsets, hard sampling), in when the architecture
starts to learn, and in how its gradient is taken; the loop, checkpoints,
logs, mixed precision and distribution are the same for all of them.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnas.data import info_field
from fastnas.errors import SearchError
from fastnas.run import checkpoint as ckpt
from fastnas.run.data import SearchLoader, default_workers, search_split
from fastnas.run.distributed import data_fingerprint
from fastnas.run.loop import Run, ratio, weight_sgd
from fastnas.search import cuda_graph
from fastnas.search.architect import first_order_arch_grads
from fastnas.search.config import RESUME_FIELDS, SearchConfig
from fastnas.search.cuda_graph import GraphedStep, check_runtime_supported, set_capturable
from fastnas.search.plots import compact_labels, write_search_plots
from fastnas.spaces import get_space

GENOTYPE_NAME = "genotype.json"
PLOT_NAME = "cells.png"


@dataclass
class SearchResult:
    """What a finished search returns: the genotype, its JSON form and the epoch log."""

    genotype: object
    genotype_dict: dict
    history: list = field(default_factory=list)
    out_dir: str | None = None


def build_supernet(
    config: SearchConfig, num_classes: int, in_channels: int, layers: int, edge_primitives: dict | None = None
) -> nn.Module:
    """The supernet ``config`` searches, with ``layers`` cells and optional per-edge candidates."""
    net = get_space(config.space).build_supernet(config, num_classes, in_channels, layers, edge_primitives)
    if not config.bn_track:
        net.use_batch_statistics()
    return net


def _entropy(net: nn.Module) -> dict:
    if hasattr(net, "arch_entropy"):
        return net.arch_entropy()
    out = {}
    for name, w in net.arch_weights().items():
        if w.dim() == 2:
            out[name] = float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean())
    return out


class _WarmupCosine:
    """The learning-rate factor of PC-DARTS' ImageNet schedule (train_search_imagenet.py):
    ``(e + 1) / warmup`` for the first ``warmup`` epochs, then the cosine from 1 to
    ``floor`` over all ``epochs``, which the warm-up overrode. A class, so LambdaLR's state
    holds it as plain numbers."""

    def __init__(self, warmup: int, epochs: int, floor: float):
        self.warmup, self.epochs, self.floor = warmup, epochs, floor

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return (epoch + 1) / self.warmup
        return self.floor + (1 - self.floor) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports the peak resident set in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Searcher(Run):
    """Runs one search described by a ``SearchConfig``.

    Args:
        config: the search.
        out_dir: folder for checkpoint.pt, log.jsonl, genotype.json and
            cells.png; None writes nothing (tests, notebooks).
        dataset: optional ``(train_set, info)`` to search on instead of
            ``fastnas.data.load_dataset(config.dataset)``; ``info`` (a dict or
            an object) needs ``num_classes`` and ``in_channels``.
        progress: show progress bars (on the first rank only).
        resume_state: a loaded checkpoint to continue (see ``Searcher.resume``).

    After ``run()``, ``self.net`` is the last stage's supernet.
    """

    kind = "search"
    what = "search"
    config_class = SearchConfig
    resume_fields = RESUME_FIELDS
    scalar_prefix = "search"
    error = SearchError
    oom_hint = (
        "try a smaller --batch-size, --amp bf16, fewer --layers or --init-channels, "
        "or partial channels (--method pc-darts)"
    )

    def __init__(self, config: SearchConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.method = config.search_method
        self.space = get_space(config.space)
        # Objects a method builds once per run and reuses (LA-DARTS' latency predictor).
        self.resources: dict = {}
        # The run's data loaders (SearchLoader), kept across epochs so that their workers persist.
        self._loaders: dict = {}
        self._data_wait = 0.0

    def _run(self) -> SearchResult:
        cfg, dist = self.config, self.dist
        self._check_processes()
        self.cuda_graph, why_not = cuda_graph.decide(cfg, dist.device, dist.world_size)
        if self.cuda_graph:
            check_runtime_supported(dist.device, dist.world_size)
        elif why_not and dist.is_main:
            print(f"fastnas search: the step runs without a CUDA graph: {why_not}", flush=True)
        if cfg.backend is not None:
            from fastnas import backends

            try:
                backends.resolve("darts_edge", dist.device, cfg.backend)
            except (RuntimeError, ValueError) as exc:
                raise SearchError(f"--backend {cfg.backend}: {exc}") from None
        train_set, info = self._load_data()
        self._begin()
        self.train_idx, self.val_idx = search_split(train_set, cfg)
        if dist.enabled:
            # Each rank (on several nodes, each node) loads the data and draws the split itself.
            dist.check_same("the search data", data_fingerprint(train_set, self.train_idx, self.val_idx))
        self.train_set, self.info = train_set, info

        stages = cfg.stages()
        state = self.resume_state
        history = list(state["history"]) if state else []
        edge_primitives = state["edge_primitives"] if state else None
        first_stage = state["stage"] if state else 0
        stage_genotypes = list(state.get("stage_genotypes", [])) if state else []
        if state is not None:
            # The log may hold epochs after the checkpoint (an interrupted epoch never
            # reaches it, but a crash between the two writes could); rewrite it.
            self._rewrite_log(history)

        for s in range(first_stage, len(stages)):
            stage = stages[s]
            net = build_supernet(
                cfg, info_field(info, "num_classes"), info_field(info, "in_channels"), stage["layers"], edge_primitives
            )
            net.to(dist.device)
            self.net = net
            parts = self.method.make_optimizers(self, net, stage)
            start_epoch = 0
            if state is not None and s == first_stage:
                start_epoch = self._load_state(state, net, parts)
            model = self._wrap(net)
            for epoch in range(start_epoch, stage["epochs"]):
                global_epoch = sum(st["epochs"] for st in stages[:s]) + epoch
                record = self._epoch(model, net, parts, stage, s, epoch, global_epoch)
                history.append(record)
                self._save(net, parts, s, epoch + 1, edge_primitives, history, stage_genotypes, record)
            if s + 1 < len(stages):
                stage_genotypes.append(self.space.to_json(self.space.genotype(net, cfg)))
                edge_primitives = self.method.after_stage(net, cfg, s) or edge_primitives

        if not self.method.trains_architecture:
            # A trained supernet, not a genotype: ``fastnas select`` searches over it.
            return SearchResult(None, {}, history, self.out_dir)
        genotype = self.space.genotype(self.net, cfg)
        result = SearchResult(genotype, self.space.to_json(genotype), history, self.out_dir)
        if self.out_dir is not None and dist.is_main:
            self._write_outputs(result)
        return result

    def _load_data(self):
        if self.dataset is not None:
            return self.dataset
        from fastnas.data import load_dataset

        cfg = self.config
        train_set, _test_set, info = load_dataset(
            cfg.dataset, root=cfg.data, image_size=cfg.image_size, fraction=cfg.fraction, seed=cfg.seed
        )
        return train_set, info

    def _make_optimizers(self, net: nn.Module, stage: dict) -> dict:
        cfg = self.config
        w_opt = weight_sgd(net.weight_parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # A captured step keeps Adam's step count on the device (capturable).
        a_opt = torch.optim.Adam(
            net.arch_parameters(),
            lr=cfg.arch_lr,
            betas=tuple(cfg.arch_betas),
            weight_decay=cfg.arch_weight_decay,
            capturable=self.cuda_graph,
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=stage["epochs"], eta_min=cfg.lr_min)
        if cfg.lr_warmup_epochs:
            sched = torch.optim.lr_scheduler.LambdaLR(
                w_opt, _WarmupCosine(cfg.lr_warmup_epochs, stage["epochs"], cfg.lr_min / cfg.lr if cfg.lr else 0.0)
            )
        use_scaler = cfg.amp == "fp16" and self.dist.device.type == "cuda"
        return {
            "w_opt": w_opt,
            "a_opt": a_opt,
            "sched": sched,
            "w_scaler": torch.amp.GradScaler("cuda", enabled=use_scaler),
            "a_scaler": torch.amp.GradScaler("cuda", enabled=use_scaler),
        }

    def _wrap(self, net: nn.Module) -> nn.Module:
        # A method that leaves parameters out of some steps.
        return super()._wrap(net, find_unused=self.method.ddp_find_unused_parameters)

    # --- one epoch --------------------------------------------------------------------

    def _epoch(self, model, net, parts, stage, s, epoch, global_epoch) -> dict:
        """Train one epoch, evaluate, and return its log record."""
        extra = self.method.on_epoch(net, self.config, stage, epoch)
        train_arch = epoch >= stage["warmup"]
        lr = parts["w_opt"].param_groups[0]["lr"]
        loaders = self._epoch_loaders(global_epoch)
        run_step = self._step_runner(model, net, parts, train_arch, lr)
        totals, elapsed, images = self._train_steps(run_step, loaders, net, train_arch, global_epoch)
        del run_step  # a captured graph's memory goes back before the evaluation
        parts["sched"].step()
        # Batch-norm statistics saw only this rank's images; evaluate and save their mean.
        self.dist.all_reduce_mean_([b for b in net.buffers() if b.is_floating_point()])
        totals = self.dist.all_reduce_sum(totals)
        self.method.before_evaluation(net, self.config)
        val = self._evaluate(net, global_epoch)
        record = {
            "epoch": global_epoch + 1,
            "stage": s,
            "stage_epoch": epoch + 1,
            "layers": stage["layers"],
            "lr": lr,
            "arch_trained": train_arch,
            "train_loss": ratio(totals[0], totals[2]),
            "train_acc": ratio(totals[1], totals[2]),
            "search_val_loss": ratio(totals[3], totals[5]),
            "search_val_acc": ratio(totals[4], totals[5]),
            "val_loss": val[0],
            "val_acc": val[1],
            "time_s": elapsed,
            "images_per_s": images / max(elapsed, 1e-9),
            **extra,
            **self.method.epoch_record(self, net),
        }
        if not self.method.uses_validation_batches:
            for key in ("search_val_loss", "search_val_acc"):
                del record[key]
        if self.method.trains_architecture:
            record["arch_weights"] = {k: v.tolist() for k, v in net.arch_weights().items()}
            if hasattr(net, "arch_weight_labels"):
                record["arch_labels"] = compact_labels(net.arch_weight_labels())
            record["entropy"] = _entropy(net)
            record["genotype"] = self.space.to_json(self.space.genotype(net, self.config))
        self._print_epoch(record)
        return record

    def _loader(self, idx, salt: int, augment: bool) -> SearchLoader:
        """A half of the split for this rank, built once per run (its workers persist)."""
        cfg, dist = self.config, self.dist
        key = (salt, augment)
        if key not in self._loaders:
            workers = cfg.workers if cfg.workers is not None else default_workers(cfg.dataset, dist.world_size)
            self._loaders[key] = SearchLoader(
                self.train_set, idx, cfg.batch_size // dist.world_size, cfg.seed + salt, dist.rank, dist.world_size,
                workers, dist.device.type == "cuda", augment, cfg.decode, dist.device,
            )  # fmt: skip
        return self._loaders[key]

    def _epoch_loaders(self, global_epoch):
        """This epoch's batches of the weights' and the architecture's halves of the split, as
        ``(steps, iterators)``: one pass over the weights' half, the architecture's half cycling
        where it is shorter (PC-DARTS' ImageNet subsets, 10% and 2.5%), as DARTS' and PC-DARTS'
        code draw it, so that an epoch is one pass over the weights' half."""
        halves = ((0, self.train_idx), (1, self.val_idx))[: 2 if self.method.uses_validation_batches else 1]
        loaders = [self._loader(idx, salt, augment=True) for salt, idx in halves]
        if min(len(loader) for loader in loaders) == 0:
            raise SearchError(
                f"the search split's halves ({len(self.train_idx)} and {len(self.val_idx)} images) "
                f"must each hold a batch of {loaders[0].batch_size}; use a smaller --batch-size"
            )
        iterators = [loaders[0].batches(global_epoch)]
        if len(loaders) > 1:
            arch = loaders[1]
            iterators.append(arch.cycle(global_epoch) if len(arch) < len(loaders[0]) else arch.batches(global_epoch))
        # The weights' half sets the epoch's length: the architecture's is as long or cycles.
        return len(loaders[0]), iterators

    def _step_runner(self, model, net, parts, train_arch, lr):
        """``run(xt, yt, xv, yv) -> tensor [train loss, train correct, val loss, val correct]``:
        the method's step on the device, eagerly or replayed from a CUDA graph."""
        step = self.method.make_step(self, model, net, parts, train_arch, lr)
        if self.cuda_graph:
            # One capture per epoch: the learning rate is baked into the graph.
            return _GraphedRunner(step, modules=[net], optimizers=[parts["w_opt"], parts["a_opt"]], key=train_arch)
        device = self.dist.device
        return lambda *batch: step(*(None if t is None else t.to(device, non_blocking=True) for t in batch))

    def _train_steps(self, run_step, loaders, net, train_arch, global_epoch):
        """Run every step of the epoch; returns (per-rank totals, seconds, images). ``loaders``:
        ``(steps, iterators)`` of ``_epoch_loaders``. Sets ``_data_wait``, the seconds spent
        waiting for batches."""
        steps, iterators = loaders
        totals = torch.zeros(6, dtype=torch.float64)  # train loss, correct, n; arch-val loss, correct, n
        bar = self._progress(steps, global_epoch, sum(st["epochs"] for st in self.config.stages()))
        start = time.perf_counter()
        images = 0
        self._data_wait = 0.0
        net.train()
        batch_iter = zip(*iterators)
        for step in range(steps):
            waited = time.perf_counter()
            batches = next(batch_iter, None)
            self._data_wait += time.perf_counter() - waited
            if batches is None:
                break
            # Methods that take no validation batches get only the training half's.
            (xt, yt), (xv, yv) = batches[0], batches[1] if len(batches) > 1 else (None, None)
            loss, right, val_loss, val_right = run_step(xt, yt, xv, yv).tolist()
            loss = self._check_finite(loss, global_epoch, step)
            totals[:3] += torch.tensor([loss * len(yt), right, len(yt)], dtype=torch.float64)
            if train_arch and yv is not None:
                totals[3:] += torch.tensor([val_loss * len(yv), val_right, len(yv)], dtype=torch.float64)
            images += len(yt) * self.dist.world_size
            self._advance(bar, start, images, loss)
        if bar is not None:
            bar.close()
        return totals, time.perf_counter() - start, images

    def _print_epoch(self, record: dict) -> None:
        if self.dist.is_main and self.progress:
            print(
                f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
                f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} | {record['images_per_s']:.0f} img/s, "
                f"{self._data_wait / max(record['time_s'], 1e-9):.0%} of it waiting for data",
                flush=True,
            )

    def _advance(self, bar, start, images, loss_value) -> None:
        if bar is not None:
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{loss_value:.3f}",
                img_s=f"{images / max(elapsed, 1e-9):.0f}",
                mem=f"{_memory_mib(self.dist.device):.0f}MiB",
                refresh=False,
            )
            bar.update(1)

    def bilevel_step(self, model, net, parts, train_arch, lr):
        """DARTS' step: the architecture's on a validation batch (while it trains), then the
        weights' on a training batch (the other way round for a method with
        ``weights_first``, GDAS). Tensors in, one tensor out, no host syncs, so
        that ``GraphedStep`` can capture it.

        Returns ``step(xt, yt, xv, yv) -> [train loss, train correct, val loss,
        val correct]`` (the val entries are 0 while the architecture is frozen).
        """
        arch = None
        if train_arch:
            arch = dict(
                gradient=self.method.arch_gradient(self, net),
                penalty=self.method.arch_penalty(self, net),
                groups=self.method.arch_groups(net),
            )

        weights_first = self.method.weights_first

        def step(xt, yt, xv, yv):
            if weights_first:
                loss, logits = self._weight_step(model, net, parts, xt, yt)
            if train_arch:
                val_loss, val_logits = self._arch_step(net, parts, arch, xt, yt, xv, yv, lr)
                val = [val_loss.float(), _correct_count(val_logits, yv)]
            if not weights_first:
                loss, logits = self._weight_step(model, net, parts, xt, yt)
            train = [loss.float(), _correct_count(logits, yt)]
            if not train_arch:
                val = [torch.zeros_like(train[0]), torch.zeros_like(train[0])]
            return torch.stack(train + val)

        return step

    def _arch_step(self, net, parts, arch, xt, yt, xv, yv, lr):
        """The architecture's step(s): each group of ``arch["groups"]`` in turn, its gradient
        taken by ``arch["gradient"]`` (first order when None) plus that of ``arch["penalty"]``.
        Returns the validation loss and logits of the first group's gradient."""
        cfg, a_opt, scaler = self.config, parts["a_opt"], parts["a_scaler"]
        gradient, penalty = arch["gradient"], arch["penalty"]
        first = None
        for group in arch["groups"]:
            if gradient is not None:
                all_grads, loss, logits = gradient(
                    xt, yt, xv, yv, lr, cfg.momentum, cfg.weight_decay, parts["w_opt"], self._autocast
                )
                by_param = dict(zip(map(id, net.arch_parameters()), all_grads))
                grads = [by_param[id(p)] for p in group]
                if penalty is not None:
                    extra = torch.autograd.grad(penalty(), group, allow_unused=True)
                    grads = [g if e is None else g + e for g, e in zip(grads, extra)]
            else:
                grads, loss, logits = first_order_arch_grads(
                    net, group, xv, yv, self._autocast, scaler.scale if scaler.is_enabled() else None, penalty
                )
            if first is None:
                first = (loss, logits)
            # The weights' gradients are averaged by DDP; the alphas' step bypasses it.
            self.dist.all_reduce_mean_(grads)
            a_opt.zero_grad(set_to_none=True)
            for p, g in zip(group, grads):
                p.grad = g.to(p.dtype)
            if cfg.arch_grad_clip is not None:
                # P-DARTS' clip_grad_norm_ of the alphas (train_search.py); stays on the device, so capturable.
                if scaler.is_enabled() and gradient is None:
                    scaler.unscale_(a_opt)
                nn.utils.clip_grad_norm_(group, cfg.arch_grad_clip)
            if scaler.is_enabled() and gradient is None:
                scaler.step(a_opt)
                scaler.update()
            else:
                a_opt.step()
        return first

    def _weight_step(self, model, net, parts, x, y):
        cfg, w_opt, scaler = self.config, parts["w_opt"], parts["w_scaler"]
        w_opt.zero_grad(set_to_none=True)
        with self._autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        scaler.scale(loss).backward()
        scaler.unscale_(w_opt)
        nn.utils.clip_grad_norm_(net.weight_parameters(), cfg.grad_clip)
        scaler.step(w_opt)
        scaler.update()
        # The alphas took a gradient from this loss too; it is not theirs to use.
        parts["a_opt"].zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    def _evaluate(self, net, global_epoch) -> tuple[float, float]:
        """Loss and accuracy on the architecture's half, batch norm in eval mode (as DARTS' infer)."""
        # Not augmented: an image folder's evaluation crop (resize and centre crop).
        return self._score(net, self._loader(self.val_idx, 2, augment=False).batches(global_epoch))

    # --- checkpoints and outputs ----------------------------------------------------

    def _save(self, net, parts, stage, stage_epoch, edge_primitives, history, stage_genotypes, record) -> None:
        position = {
            "stage": stage,
            "stage_epoch": stage_epoch,
            "edge_primitives": edge_primitives,
            "stage_genotypes": stage_genotypes,
        }
        super()._save(net, {**position, **{k: p.state_dict() for k, p in parts.items()}}, history, record)

    def _write_epoch_outputs(self, history: list, record: dict) -> None:
        # Pictures of the run so far (arch_weights.png, curves.png), so an interrupted one has them.
        write_search_plots(self.out_dir, history)
        if "genotype" in record:
            ckpt.atomic_write_text(
                os.path.join(self.out_dir, GENOTYPE_NAME), json.dumps(record["genotype"], indent=2) + "\n"
            )

    def _position(self, state: dict, parts: dict) -> int:
        # The checkpoint may come from a run with or without --cuda-graph.
        set_capturable(parts["a_opt"], self.cuda_graph)
        return int(state["stage_epoch"])

    def _write_outputs(self, result: SearchResult) -> None:
        ckpt.atomic_write_text(
            os.path.join(self.out_dir, GENOTYPE_NAME), json.dumps(result.genotype_dict, indent=2) + "\n"
        )
        self.space.plot(result.genotype, os.path.join(self.out_dir, PLOT_NAME))


class _GraphedRunner:
    """A step captured as a CUDA graph on its first batch (``GraphedStep``), then replayed."""

    def __init__(self, step, modules, optimizers, key):
        self.step, self.modules, self.optimizers, self.key = step, modules, optimizers, key
        self.graphed = None

    def __call__(self, *batch):
        if self.graphed is None:
            self.graphed = GraphedStep(self.step, batch, modules=self.modules, optimizers=self.optimizers, key=self.key)
        # The batch is copied into the graph's inputs; the outputs are read after the replay.
        return self.graphed(*batch)


def _correct_count(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``fastnas.run.loop.correct`` left on the device, as a float tensor."""
    return (logits.argmax(dim=1) == y).sum().float()


def search(config: SearchConfig, out_dir: str | None = None, **kwargs) -> SearchResult:
    """Run the search ``config`` describes; see ``Searcher`` for the arguments."""
    return Searcher(config, out_dir=out_dir, **kwargs).run()
