"""Stand-alone accuracies of NAS-Bench-201 cells, read from the benchmark's own file.

The benchmark (Dong and Yang, ICLR 2020) trained every one of the 15,625 cells and
published the results as one ``torch.save``d dict (``NAS-Bench-201-v1_1-096897.pth`` and
its predecessor ``-v1_0-e61699.pth``); the ``nas-bench-201`` package
(``pip install nas-bench-201``, module ``nas_201_api``) reads it. This module is the one
place fastnas reads it from: ``fastnas rank-eval``, ``fastnas train`` and ``fastnas select``
take ``--benchmark FILE``.

The file holds ``meta_archs`` (every cell's string, its position the cell's index),
``evaluated_indexes`` and ``arch2infos``: index -> ``{"less": ..., "full": ...}``, the state
of an ``ArchResults`` for the 12-epoch and the 200-epoch schedules, keyed in the API as
``hp="12"`` and ``hp="200"``. An ``ArchResults`` keeps, per (dataset, seed), the trial's
per-epoch accuracies (percent) on each evaluation set.

What is read (``BenchmarkMetric``): by default the validation accuracy on
``cifar10-valid`` (trained on CIFAR-10's 25,000-image training half, measured on the
25,000-image validation half) after the full 200-epoch schedule, the mean over the
benchmark's trials (seeds). That is the number the benchmark gives search methods to rank
by; the test accuracies stay for reporting a found cell (``--benchmark-set test``).
``--benchmark-dataset`` picks cifar10 (trained on train + valid; test only), cifar100 or
ImageNet16-120; ``--benchmark-epochs 12`` the short schedule.

A fastnas cell (``NB201Arch``) already has the benchmark's edge order and operation names
(``fastnas.spaces.nb201``); its string, with each node's inputs in ascending order, is the
key of ``meta_archs``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fastnas.spaces.nb201.genotype import NB201_PRIMITIVES, NB201Arch

PACKAGE_HINT = "pip install nas-bench-201"
DATASETS = ("cifar10-valid", "cifar10", "cifar100", "ImageNet16-120")
SETS = ("valid", "test")
EPOCHS = (200, 12)

# (dataset, set) -> the evaluation set's name inside the file.
_SET_NAMES = {
    ("cifar10-valid", "valid"): "x-valid",
    ("cifar10-valid", "test"): "ori-test",
    ("cifar10", "test"): "ori-test",
    ("cifar100", "valid"): "x-valid",
    ("cifar100", "test"): "x-test",
    ("ImageNet16-120", "valid"): "x-valid",
    ("ImageNet16-120", "test"): "x-test",
}


class BenchmarkError(Exception):
    """The benchmark file or a query of it failed; the message says why."""


@dataclass(frozen=True)
class BenchmarkMetric:
    """Which of the benchmark's accuracies stands for a cell's stand-alone accuracy."""

    dataset: str = "cifar10-valid"
    set: str = "valid"
    epochs: int = 200

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise BenchmarkError(f"the benchmark's datasets are {list(DATASETS)}, not {self.dataset!r}")
        if self.epochs not in EPOCHS:
            raise BenchmarkError(f"the benchmark trained for 200 or 12 epochs, not {self.epochs}")
        if (self.dataset, self.set) not in _SET_NAMES:
            sets = [s for d, s in _SET_NAMES if d == self.dataset]
            raise BenchmarkError(
                f"{self.dataset} has no {self.set!r} accuracy in NAS-Bench-201 (it has {sets}; cifar10 is trained on "
                "train + valid, cifar10-valid keeps the validation half)"
            )

    @property
    def set_name(self) -> str:
        """The evaluation set's name in the file (``x-valid``, ``x-test``, ``ori-test``)."""
        return _SET_NAMES[(self.dataset, self.set)]

    def describe(self) -> str:
        return f"{self.dataset} {self.set} accuracy after {self.epochs} epochs"

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "set": self.set, "epochs": self.epochs}


def benchmark_string(arch) -> str:
    """The benchmark's key of a cell: an ``NB201Arch``, its string or its JSON form ``{"arch": ...}``.

    Each node's inputs are put in ascending order of source node, the order of the benchmark's
    strings, and every operation must be one of the benchmark's five.
    """
    try:
        if isinstance(arch, dict):
            arch = NB201Arch.from_dict(arch)
        elif isinstance(arch, str):
            arch = NB201Arch.from_string(arch)
    except (ValueError, TypeError) as exc:
        raise BenchmarkError(f"not a NAS-Bench-201 cell: {exc}") from None
    if not isinstance(arch, NB201Arch):
        raise BenchmarkError(f"not a NAS-Bench-201 cell: {arch!r}")
    if len(arch.nodes) != 3:
        raise BenchmarkError(f"{arch.to_string()!r} has {len(arch.nodes) + 1} nodes; NAS-Bench-201 cells have 4")
    unknown = sorted({op for node in arch.nodes for op, _ in node if op not in NB201_PRIMITIVES})
    if unknown:
        raise BenchmarkError(
            f"{arch.to_string()!r} uses {unknown}, which NAS-Bench-201 does not have (its operations are "
            f"{NB201_PRIMITIVES})"
        )
    return NB201Arch([sorted(node, key=lambda item: item[1]) for node in arch.nodes]).to_string()


class NB201Benchmark:
    """A NAS-Bench-201 benchmark file, read once; ``accuracy(arch)`` looks a cell up.

    Args:
        path: the benchmark file.
        metric: which accuracy to read (default: cifar10-valid, validation, 200 epochs).

    Raises ``BenchmarkError`` for a missing or unreadable file and when ``nas_201_api`` is
    not installed.
    """

    def __init__(self, path: str, metric: BenchmarkMetric | None = None):
        self.path = str(path)
        self.metric = metric or BenchmarkMetric()
        NASBench201API = self.check(self.path)
        try:
            # The API loads the file itself (torch.load, weights only by default on torch >= 2.6); given
            # the dict instead it would deep-copy all of it.
            self.api = NASBench201API(self.path, verbose=False)
        except Exception as exc:
            reason = _reason(exc)
            raise BenchmarkError(f"{self.path} is not a readable NAS-Bench-201 benchmark file ({reason})") from None

    @staticmethod
    def check(path: str):
        """Raise ``BenchmarkError`` unless ``path`` is a file and the package is installed (cheap: nothing
        is read, so that a command can check before its work); returns the package's API class."""
        if not os.path.isfile(path):
            raise BenchmarkError(f"no NAS-Bench-201 benchmark file at {path}")
        try:
            from nas_201_api import NASBench201API
        except ImportError as exc:
            raise BenchmarkError(
                f"--benchmark reads the file with the nas-bench-201 package, which is not installed ({exc}); "
                f"{PACKAGE_HINT}"
            ) from None
        return NASBench201API

    def index(self, arch) -> int:
        """The cell's index in the benchmark; raises ``BenchmarkError`` if the file lacks it."""
        key = benchmark_string(arch)
        index = self.api.query_index_by_arch(key)
        if index < 0:
            raise BenchmarkError(f"{key} is not in the benchmark file {self.path} ({len(self.api)} architectures)")
        if index not in self.api.arch2infos_dict:
            raise BenchmarkError(f"{key} (index {index}) has no results in the benchmark file {self.path}")
        return index

    def accuracy(self, arch) -> float:
        """The cell's accuracy (a fraction) by ``metric``, averaged over the benchmark's trials."""
        index = self.index(arch)
        metric = self.metric
        try:
            results = self.api.query_meta_info_by_index(index, hp=str(metric.epochs))
        except ValueError as exc:
            raise BenchmarkError(f"{benchmark_string(arch)}: no {metric.epochs}-epoch results ({exc})") from None
        if metric.dataset not in results.get_dataset_names():
            raise BenchmarkError(
                f"{benchmark_string(arch)}: no {metric.dataset} results after {metric.epochs} epochs in {self.path} "
                f"(it has {results.get_dataset_names()})"
            )
        try:
            value = results.get_metrics(metric.dataset, metric.set_name, iepoch=None, is_random=False)["accuracy"]
        except (KeyError, IndexError, AssertionError, TypeError) as exc:
            raise BenchmarkError(
                f"{benchmark_string(arch)}: no {metric.describe()} in {self.path} ({type(exc).__name__}: {exc})"
            ) from None
        return float(value) / 100

    def describe(self) -> str:
        return f"NAS-Bench-201 ({os.path.basename(self.path)}), {self.metric.describe()}"


def _reason(exc: Exception) -> str:
    """One line of why loading failed; torch's refusal of a non-weights pickle spans a page."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation", 1)[0].split())
        return f"torch.load with weights_only=True refused it: {detail}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
