"""An epoch record's numbers as TensorBoard scalars (``fastnas search/train --tensorboard DIR``).

The same numbers as ``log.jsonl``, one event per epoch (the step is the
epoch, 1-based), under these tags:

- ``loss/train``, ``loss/search_val``, ``loss/val``, ``loss/test`` and the
  same under ``accuracy/``, where the record has them;
- ``arch_weights/<cell>/<edge>/<candidate>``: each edge's softmaxed
  architecture weights (edges named as in cells.png, ``c_k-1_to_2``);
- ``entropy/<cell>``, and every other number of the record under
  ``search/`` (``training/`` for ``fastnas train``): the learning rate,
  images per second, a method's own figures such as LA-DARTS' predicted latency.

``torch.utils.tensorboard`` needs the ``tensorboard`` package, which fastnas
does not require: ``missing_reason()`` says why it cannot be used, and the
configs turn that into a one-line error when ``--tensorboard`` is asked for.
"""

from __future__ import annotations

import math
import re

# Bookkeeping fields of a record, not measurements.
_SKIPPED = ("epoch", "stage", "stage_epoch", "layers", "arch_trained")
_CURVES = {"loss": "loss", "acc": "accuracy"}


def missing_reason() -> str | None:
    """Why TensorBoard event files cannot be written here, or None when they can."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        return f"{exc}; install it with: pip install tensorboard"
    return None


def _tag(text: str) -> str:
    """``text`` in the characters TensorBoard keeps in a tag (others become a warning and ``_``)."""
    return re.sub(r"[^-\w.]+", "", str(text).replace(" -> ", "_to_").replace(" ", "_"))


def record_scalars(record: dict, prefix: str = "search") -> dict[str, float]:
    """The scalars of one epoch record, by tag (finite numbers only); numbers other than
    losses and accuracies go under ``prefix``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        split, _, kind = key.rpartition("_")
        if kind in _CURVES and split:
            out[f"{_CURVES[kind]}/{split}"] = float(value)
        else:
            out[f"{prefix}/{key}"] = float(value)
    for cell, value in (record.get("entropy") or {}).items():
        out[f"entropy/{_tag(cell)}"] = float(value)
    labels = record.get("arch_labels") or {}
    for key, weights in (record.get("arch_weights") or {}).items():
        if not weights or not isinstance(weights[0], list):
            continue  # a vector (PC-DARTS' edge betas): one tag per element
        spec = labels.get(key) or {}
        rows = spec.get("rows") or [f"edge{e}" for e in range(len(weights))]
        candidates = spec.get("candidates") or []
        for e, row in enumerate(weights):
            if candidates and isinstance(candidates[0], str):
                names = candidates
            else:
                names = candidates[e] if e < len(candidates) else []
            for k, value in enumerate(row):
                name = names[k] if k < len(names) else str(k)
                out[f"arch_weights/{_tag(key)}/{_tag(rows[e])}/{_tag(name)}"] = float(value)
    for key, weights in (record.get("arch_weights") or {}).items():
        if weights and not isinstance(weights[0], list):
            for e, value in enumerate(weights):
                out[f"arch_weights/{_tag(key)}/{e}"] = float(value)
    return {tag: value for tag, value in out.items() if math.isfinite(value)}


class ScalarWriter:
    """Writes each epoch record to TensorBoard event files in ``log_dir`` (opened at the first record)."""

    def __init__(self, log_dir: str, prefix: str = "search"):
        self.log_dir, self.prefix = log_dir, prefix
        self._writer = None

    def write(self, record: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)
        step = int(record["epoch"])
        for tag, value in record_scalars(record, self.prefix).items():
            self._writer.add_scalar(tag, value, global_step=step)
        # An interrupted run keeps every epoch it finished.
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
