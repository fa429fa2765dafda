"""Training a found architecture from scratch: the loop, its checkpoints, logs and final report.

The loop is DARTS' ``train.py``: SGD with momentum, the auxiliary loss
weighted in, gradients clipped, drop-path rising linearly over the epochs, the
test set evaluated after every epoch. Checkpoints, logs, mixed precision and
distribution are ``fastnas.run``'s, shared with the search.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from fastnas.errors import TrainError
from fastnas.run import checkpoint as ckpt
from fastnas.run.data import epoch_loader
from fastnas.run.loop import Run, correct, ratio, weight_sgd
from fastnas.train import report as costs
from fastnas.train.architecture import build_eval_network, describe
from fastnas.train.config import RESUME_FIELDS, TrainConfig

CHECKPOINT_KIND = "train"
REPORT_NAME = "report.json"


@dataclass
class TrainResult:
    """What a finished training returns: its report and the epoch log."""

    report: dict
    history: list = field(default_factory=list)
    out_dir: str | None = None


class Trainer(Run):
    """Trains the architecture a ``TrainConfig`` describes, from scratch.

    Args:
        config: the training.
        out_dir: folder for checkpoint.pt, log.jsonl and report.json; None writes nothing.
        dataset: optional ``(train_set, test_set, info)`` to train on instead of
            ``fastnas.data.load_dataset(config.dataset)``; ``info`` needs
            ``num_classes``, ``in_channels`` and ``image_size``.
        progress: show progress bars and a line per epoch (on the first rank only).
        resume_state: a loaded checkpoint to continue (see ``Trainer.resume``).

    After ``run()``, ``self.net`` is the trained network.
    """

    kind = CHECKPOINT_KIND
    what = "training"
    config_class = TrainConfig
    resume_fields = RESUME_FIELDS
    scalar_prefix = "training"
    error = TrainError

    def _run(self) -> TrainResult:
        cfg, dist = self.config, self.dist
        self._check_processes()
        train_set, test_set, info = self._load_data()
        self._begin()

        net = build_eval_network(cfg, info["num_classes"], info["in_channels"]).to(dist.device)
        self.net = net
        parts = self._make_optimizer(net)
        state = self.resume_state
        history = list(state["history"]) if state else []
        start_epoch = self._load_state(state, net, parts) if state else 0
        if state is not None:
            self._rewrite_log(history)
        model = self._wrap(net)
        for epoch in range(start_epoch, cfg.epochs):
            record = self._epoch(model, net, parts, train_set, test_set, epoch)
            history.append(record)
            self._save(net, {"epoch": epoch + 1, **{k: p.state_dict() for k, p in parts.items()}}, history, record)

        report = self._report(net, info, history, len(test_set))
        if self.out_dir is not None and dist.is_main:
            ckpt.atomic_write_text(os.path.join(self.out_dir, REPORT_NAME), json.dumps(report, indent=2) + "\n")
        return TrainResult(report, history, self.out_dir)

    def _load_data(self):
        cfg = self.config
        if self.dataset is not None:
            train_set, test_set, info = self.dataset
        else:
            from fastnas.data import load_dataset

            train_set, test_set, info = load_dataset(
                cfg.dataset, root=cfg.data, image_size=cfg.image_size, fraction=cfg.fraction, seed=cfg.seed
            )
        from fastnas.train.augment import augment_training_set

        try:
            train_set = augment_training_set(train_set, cfg, info["image_size"], info["in_channels"])
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        return train_set, test_set, info

    def _make_optimizer(self, net: nn.Module) -> dict:
        cfg = self.config
        opt = weight_sgd(
            net.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
        if cfg.lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr_min)
        elif cfg.lr_schedule == "linear":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 - epoch / cfg.epochs)
        else:
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_gamma)
        use_scaler = cfg.amp == "fp16" and self.dist.device.type == "cuda"
        return {"opt": opt, "sched": sched, "scaler": torch.amp.GradScaler("cuda", enabled=use_scaler)}

    # --- one epoch --------------------------------------------------------------------

    def drop_path_prob(self, epoch: int) -> float:
        """Drop-path probability of ``epoch`` (0-based): 0 at the start, rising linearly (DARTS)."""
        return self.config.drop_path_prob * epoch / self.config.epochs

    def _epoch(self, model, net, parts, train_set, test_set, epoch: int) -> dict:
        cfg, dist = self.config, self.dist
        # An epoch's augmentation and drop-path masks depend on (seed, epoch, rank)
        # alone: ranks draw differently, and a resumed run draws what an
        # uninterrupted one would.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + dist.rank)
        net.drop_path_prob = self.drop_path_prob(epoch)
        per_rank = cfg.batch_size // dist.world_size
        loader = epoch_loader(
            train_set,
            range(len(train_set)),
            per_rank,
            cfg.seed,
            epoch,
            dist.rank,
            dist.world_size,
            cfg.workers,
            dist.device.type == "cuda",
        )
        if len(loader) == 0:
            raise TrainError(
                f"the {len(train_set)}-image training set is smaller than one batch of {per_rank}; "
                "use a smaller --batch-size"
            )
        lr = parts["opt"].param_groups[0]["lr"]
        totals = torch.zeros(3, dtype=torch.float64)  # loss, correct, images
        bar = self._progress(len(loader), epoch, cfg.epochs)
        start = time.perf_counter()
        net.train()
        for step, (x, y) in enumerate(loader):
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            loss, logits = self._step(model, net, parts, x, y)
            value = self._check_finite(loss, epoch, step)
            totals += torch.tensor([value * len(y), correct(logits, y), len(y)], dtype=torch.float64)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        parts["sched"].step()
        # Batch-norm statistics saw only this rank's images; evaluate and save their mean.
        dist.all_reduce_mean_([b for b in net.buffers() if b.is_floating_point()])
        totals = dist.all_reduce_sum(totals)
        test_loss, test_acc = self.evaluate(net, test_set)
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "drop_path_prob": net.drop_path_prob,
            "train_loss": ratio(totals[0], totals[2]),
            "train_acc": ratio(totals[1], totals[2]),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "time_s": elapsed,
            "images_per_s": float(totals[2]) / max(elapsed, 1e-9),
        }
        if dist.is_main and self.progress:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} "
                f"| test loss {test_loss:.4f} acc {test_acc:.3f} | {record['images_per_s']:.0f} img/s",
                flush=True,
            )
        return record

    def _step(self, model, net, parts, x, y):
        """One SGD step; returns the loss (main plus weighted auxiliary) and the main logits."""
        cfg, opt, scaler = self.config, parts["opt"], parts["scaler"]
        opt.zero_grad(set_to_none=True)
        with self._autocast():
            logits, logits_aux = model(x)
            loss = classification_loss(logits, logits_aux, y, cfg.auxiliary_weight, cfg.label_smoothing)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        return loss.detach(), logits.detach()

    def evaluate(self, net: nn.Module, test_set) -> tuple[float, float]:
        """Loss and accuracy on every test image once, batch norm in eval mode."""
        cfg, dist = self.config, self.dist
        # Each rank takes every world_size-th image: no image twice, none left out.
        shard = Subset(test_set, range(dist.rank, len(test_set), dist.world_size))
        loader = DataLoader(
            shard,
            batch_size=max(1, cfg.batch_size // dist.world_size),
            shuffle=False,
            num_workers=cfg.workers,
            pin_memory=dist.device.type == "cuda",
        )
        return self._score(net, loader, logits_of=lambda out: out[0])

    def _report(self, net: nn.Module, info: dict, history: list, test_images: int) -> dict:
        """Accuracy of the last epoch, parameters, FLOPs and latency (latency on the first rank only)."""
        cfg, dist = self.config, self.dist
        params, aux_params = costs.count_parameters(net)
        size, channels = info["image_size"], info["in_channels"]
        flops = costs.count_flops(net, channels, size, dist.device)
        last = history[-1] if history else {}
        report = {
            "architecture": describe(cfg.space, cfg.genotype),
            "space": cfg.space,
            "genotype": cfg.genotype,
            "dataset": cfg.dataset,
            "image_size": size,
            "epochs": cfg.epochs,
            "test_accuracy": last.get("test_acc", float("nan")),
            "test_loss": last.get("test_loss", float("nan")),
            "test_images": test_images,
            "parameters": params,
            "auxiliary_parameters": aux_params,
            "flops_per_image": flops,
            "multiply_adds_per_image": flops // 2,
            "train_time_s": sum(r.get("time_s", 0.0) for r in history),
            "amp": cfg.amp,
            "processes": dist.world_size,
        }
        if dist.is_main:
            report.update(costs.measure_latency(net, cfg.latency_batch, channels, size, dist.device, self._autocast))
            if dist.device.type == "cpu":
                report["latency_threads"] = torch.get_num_threads()
        return report


def classification_loss(
    logits: torch.Tensor,
    logits_aux: torch.Tensor | None,
    targets: torch.Tensor,
    auxiliary_weight: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of the logits plus ``auxiliary_weight`` times that of the auxiliary logits, if any.

    Label smoothing puts ``1 - eps`` on the target and ``eps / classes`` on every
    class, as DARTS' ImageNet ``CrossEntropyLabelSmooth``; it applies to both terms there.
    """
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if logits_aux is not None:
        loss = loss + auxiliary_weight * F.cross_entropy(logits_aux, targets, label_smoothing=label_smoothing)
    return loss


def train(config: TrainConfig, out_dir: str | None = None, **kwargs) -> TrainResult:
    """Run the training ``config`` describes; see ``Trainer`` for the arguments."""
    return Trainer(config, out_dir=out_dir, **kwargs).run()
