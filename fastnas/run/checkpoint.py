"""Checkpoints written atomically, read back with clear errors, and RNG state capture."""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch

from fastnas.errors import CheckpointError

FORMAT = "fastnas-search-checkpoint"  # the format tag of search checkpoints
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then move the result over ``path`` in one step.

    A crash or interruption while writing leaves the previous file intact.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def _format(kind: str) -> str:
    """The format tag of a ``kind`` ("search" or "train") checkpoint."""
    return f"fastnas-{kind}-checkpoint"


def save_checkpoint(path: str, state: dict, kind: str = "search") -> None:
    """Save ``state`` with the format tag of ``kind``, atomically."""
    state = {"format": _format(kind), "version": VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, kind: str = "search") -> dict:
    """Load a ``kind`` checkpoint written by ``save_checkpoint``; raise CheckpointError otherwise."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; --resume takes the output folder of an earlier {kind}")
    try:
        # weights_only: a checkpoint is data, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or not a checkpoint ({type(exc).__name__}); "
            f"start a new {kind}, or resume from another folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _format(kind):
        raise CheckpointError(f"{path} is not a fastnas {kind} checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('version')}; this fastnas reads version {VERSION}"
        )
    return state


def capture_rng_state() -> dict:
    """The state of every random generator a search draws from."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
