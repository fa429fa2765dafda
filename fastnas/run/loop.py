"""What a search and a training share: one run with its checkpoints, resume, log and errors.

``Run`` is the base of ``fastnas.search.Searcher`` and ``fastnas.train.Trainer``.
It owns the parts of a run that do not depend on what is trained: the
distributed set-up and tear-down, resuming from a checkpoint (settings that
change what is computed must match), seeding, wrapping for
DistributedDataParallel, mixed precision, the finite-loss check that stops
every rank together, progress bars, and writing a checkpoint, the epoch log and
TensorBoard scalars once per epoch. A subclass says what its checkpoint kind,
settings class and messages are, and writes its own epochs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnas.errors import CheckpointError, NonFiniteLossError, OutOfMemoryError, RunError
from fastnas.run import checkpoint as ckpt
from fastnas.run.distributed import DistributedContext, setup
from fastnas.run.scalars import ScalarWriter

LOG_NAME = "log.jsonl"


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's generators (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def weight_sgd(params, lr: float, **options) -> torch.optim.SGD:
    """SGD for a network's weights with its multi-tensor (foreach) step, which PyTorch picks
    by default on CUDA but not on the CPU: on a DARTS search network's 1,400 weight tensors
    the per-tensor loop costs about 12 ms of host time per step, this 9 ms, with the same
    arithmetic (bit-identical). Not the fused step: it fails when only some parameters hold
    a momentum buffer, as after the first steps of a method that samples paths."""
    return torch.optim.SGD(params, lr, foreach=True, **options)


def correct(logits: torch.Tensor, y: torch.Tensor) -> float:
    """How many rows of ``logits`` have their largest value at the label."""
    return float((logits.argmax(dim=1) == y).sum())


def ratio(a, b) -> float:
    """``a / b`` as a float, NaN where ``b`` is 0."""
    return float(a / b) if float(b) > 0 else float("nan")


def cuda_oom_errors() -> tuple:
    """The exception classes torch raises when a device runs out of memory."""
    errors = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(dict.fromkeys(errors))


class Run:
    """One run of a subclass's epochs, resumable from the checkpoint it writes after each.

    Args:
        config: the run's settings (a dataclass with ``validate``, ``to_dict``,
            ``from_dict``, ``device``, ``seed``, ``amp``, ``batch_size``,
            ``world_size`` and ``tensorboard``).
        out_dir: folder for checkpoint.pt, log.jsonl and the subclass's outputs;
            None writes nothing (tests, notebooks).
        dataset: optional data to run on instead of loading ``config.dataset``.
        progress: show progress bars and a line per epoch (on the first rank only).
        resume_state: a loaded checkpoint to continue (see ``resume``).

    A subclass sets the class attributes below and implements ``_run``.
    """

    kind: str = "run"  # the checkpoint's kind (fastnas.run.checkpoint)
    what: str = "run"  # the noun of messages: "a new {what}"
    config_class: type
    resume_fields: frozenset = frozenset()  # settings a resumed run must keep
    scalar_prefix: str = "run"  # TensorBoard tag prefix
    error: type = RunError  # the class of the run's own errors (bad settings, data)
    oom_hint: str = "try a smaller --batch-size or --amp bf16"

    def __init__(
        self,
        config,
        out_dir: str | None = None,
        dataset=None,
        progress: bool = True,
        resume_state: dict | None = None,
    ):
        config.validate()
        self.config = config
        self.out_dir = out_dir
        self.dataset = dataset
        self.progress = progress
        self.resume_state = resume_state
        self.net: nn.Module | None = None
        self.dist = DistributedContext()
        # Whether the step is captured as a CUDA graph (a search decides when it starts).
        self.cuda_graph = False
        self.scalars = ScalarWriter(config.tensorboard, prefix=self.scalar_prefix) if config.tensorboard else None

    @classmethod
    def resume(cls, out_dir: str, overrides: dict | None = None, **kwargs):
        """Continue the run whose checkpoint is in ``out_dir``.

        ``overrides`` may change how the run goes (device, workers, backend) but
        not what it computes; a conflicting setting raises CheckpointError.
        """
        try:
            state = ckpt.load_checkpoint(out_dir, kind=cls.kind)
        except CheckpointError as exc:
            missing = not (os.path.isfile(out_dir) or os.path.isfile(os.path.join(out_dir, ckpt.CHECKPOINT_NAME)))
            if missing and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise CheckpointError(
                    f"{exc}; under torchrun every process reads the checkpoint: on several nodes give --resume "
                    "a folder they share, or copy rank 0's folder to the same path on every node"
                ) from None
            raise
        try:
            config = cls.config_class.from_dict(state["config"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint in {out_dir} has no valid {cls.what} settings ({exc})") from None
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key in cls.resume_fields and getattr(config, key) != value:
                raise CheckpointError(
                    f"the checkpoint in {out_dir} was made with {key}={getattr(config, key)!r}, "
                    f"but {key}={value!r} was asked for; drop that option to resume, or start a new {cls.what}"
                )
            setattr(config, key, value)
        return cls(config, out_dir=out_dir, resume_state=state, **kwargs)

    # --- the run ----------------------------------------------------------------------

    def run(self):
        """Set up the processes, run ``_run``, and always tear down."""
        self.dist = setup(self.config.device)
        try:
            return self._run()
        except cuda_oom_errors() as exc:
            raise OutOfMemoryError(
                f"the {self.dist.device} device ran out of memory at batch size {self.config.batch_size} "
                f"({str(exc).splitlines()[0]}); {self.oom_hint}"
            ) from None
        finally:
            if self.scalars is not None:
                self.scalars.close()
            self.dist.close()

    def _run(self):
        raise NotImplementedError

    def _check_processes(self) -> None:
        """The process count must be the checkpoint's and divide the batch."""
        cfg, dist = self.config, self.dist
        if cfg.world_size != dist.world_size:
            if self.resume_state is not None:
                raise CheckpointError(
                    f"the checkpoint was made by {cfg.world_size} processes but {dist.world_size} are running; "
                    "resume with the same --nproc_per_node"
                )
            cfg.world_size = dist.world_size
        if cfg.batch_size % dist.world_size:
            raise self.error(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} processes")

    def _begin(self) -> None:
        """The output folder, the seed and deterministic cuDNN, before the network is built."""
        if self.out_dir is not None and self.dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        seed_everything(self.config.seed)
        if self.dist.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def _wrap(self, net: nn.Module, find_unused: bool = False) -> nn.Module:
        """``net`` in DistributedDataParallel when several processes run, else ``net``."""
        if not self.dist.enabled:
            return net
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # Parameters some steps leave out, or that the network never uses (fewer than 3 cells).
        unused = find_unused or getattr(net, "has_unused_parameters", lambda: False)()
        return DDP(net, device_ids=device_ids, find_unused_parameters=unused)

    def _autocast(self):
        amp = self.config.amp
        if amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        # Cached casts would outlive the captured region they were made in.
        return torch.autocast(self.dist.device.type, dtype=dtype, cache_enabled=not self.cuda_graph)

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> float:
        """The loss as a float; every rank stops together when one of them saw inf or NaN."""
        value = float(loss)
        bad = not math.isfinite(value)
        if self.dist.enabled:
            # Every rank must stop together, or the others wait forever in a collective.
            bad = bool(self.dist.all_reduce_sum(torch.tensor([float(bad)], device=self.dist.device)).item())
        if bad:
            raise NonFiniteLossError(
                f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}; stopped, the last good "
                "checkpoint is kept. Try a lower --lr, --amp bf16 instead of fp16, or another --seed"
            )
        return value

    @torch.no_grad()
    def _score(self, net: nn.Module, batches, logits_of=lambda out: out) -> tuple[float, float]:
        """Mean loss and accuracy of ``net`` over ``batches`` and every rank's batches,
        batch norm in eval mode; ``logits_of`` picks the logits from the network's output."""
        net.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        for x, y in batches:
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            with self._autocast():
                logits = logits_of(net(x))
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            totals += torch.tensor([float(loss), correct(logits, y), len(y)], dtype=torch.float64)
        net.train()
        totals = self.dist.all_reduce_sum(totals)
        return ratio(totals[0], totals[2]), ratio(totals[1], totals[2])

    def _progress(self, steps: int, epoch: int, epochs: int):
        """A progress bar for one epoch, on the first rank when progress is shown; else None."""
        if not (self.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)

    # --- checkpoints and the log ------------------------------------------------------

    def _save(self, net: nn.Module, state: dict, history: list, record: dict) -> None:
        """After an epoch: refuse non-finite parameters, then write the checkpoint (``state``
        plus settings, network and generator states), the epoch's log line and its scalars.

        Every rank calls it; only the first writes. Ranks hold the same parameters, so
        all of them stop here together.
        """
        for p in net.parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLossError(
                    f"a parameter became inf or NaN in epoch {record['epoch']}; the last good checkpoint is kept. "
                    "Try a lower --lr or --amp bf16"
                )
        if self.scalars is not None and self.dist.is_main:
            self.scalars.write(record)
        if self.out_dir is None or not self.dist.is_main:
            self.dist.barrier()
            return
        state = {
            "config": self.config.to_dict(),
            **state,
            "history": history,
            "model": net.state_dict(),
            "rng": ckpt.capture_rng_state(),
        }
        ckpt.save_checkpoint(os.path.join(self.out_dir, ckpt.CHECKPOINT_NAME), state, kind=self.kind)
        with open(os.path.join(self.out_dir, LOG_NAME), "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_epoch_outputs(history, record)
        self.dist.barrier()

    def _write_epoch_outputs(self, history: list, record: dict) -> None:
        """What a subclass writes beside the checkpoint after each epoch (first rank only)."""

    def _load_state(self, state: dict, net: nn.Module, parts: dict) -> int:
        """Restores the network, every entry of ``parts`` the checkpoint holds, and the
        generators; returns ``_position(state, parts)``, where the run goes on."""
        try:
            net.load_state_dict(state["model"])
            for key, part in parts.items():
                if state.get(key):
                    part.load_state_dict(state[key])
            position = self._position(state, parts)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"the checkpoint does not fit this network ({str(exc).splitlines()[0]}); "
                f"it was made by another version or settings; start a new {self.what}"
            ) from None
        # Last, so building the network above did not consume the restored state.
        ckpt.restore_rng_state(state["rng"])
        return position

    def _position(self, state: dict, parts: dict) -> int:
        """The epoch a resumed run starts at, read from its checkpoint."""
        return int(state["epoch"])

    def _rewrite_log(self, history: list) -> None:
        """The log of a resumed run, rewritten from its checkpoint (it may hold later epochs)."""
        if self.out_dir is None or not self.dist.is_main:
            return
        text = "".join(json.dumps(r) + "\n" for r in history)
        ckpt.atomic_write_text(os.path.join(self.out_dir, LOG_NAME), text)
