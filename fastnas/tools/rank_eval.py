"""How well a trained supernet ranks architectures (``fastnas rank-eval``).

N architectures are drawn uniformly from the space; each is trained stand-alone
with ``fastnas train``'s recipe on a short schedule (several at once, one per
worker process) and scored by the supernet (its path, batch norms
recalibrated, validation accuracy, as ``fastnas select`` scores). The report
gives Kendall's tau, Yu et al.'s sparse Kendall tau (stand-alone accuracies
binned at 0.1%; the study's form and the tau-b form, ``rank_metrics``), Spearman's
rho, the top-k overlap and the stand-alone accuracy of the supernet's top 3.

Yu et al.'s heuristics are settings of the supernet training
(``SearchConfig``): ``bn_affine``, ``bn_track``, ``path_dropout``,
``method=fairnas`` (fair sampling), ``warmup_epochs``, ``lr``, ``weight_decay``,
``epochs``, ``layers``, ``init_channels``, ``train_portion``, ``batch_size``,
``label_smoothing`` and, on the nb201 supernet, ``global_dropout``,
``layer_path_dropout``, ``ops_on_nodes`` and ``ofa_kernel``
(``fastnas.spaces.nb201.heuristics``, which says why dynamic channels are not
among them). ``compare`` trains one supernet per setting and ranks the same
stand-alone results with each; ``heuristics(space)`` is the default list.

Outputs in the output folder: ``standalone.json`` (every stand-alone result,
reused by later runs with the same architectures and recipe), one search folder
per setting (``supernet-<name>``), ``pairs-<name>.json`` (every architecture's
stand-alone accuracy and supernet score), ``scatter-<name>.png``,
``report.json`` and, for a comparison, ``table.md``.

With ``benchmark`` (a NAS-Bench-201 benchmark file, nb201 space only) nothing is trained
stand-alone: each architecture's accuracy is the benchmark's
(``fastnas.spaces.nb201.benchmark``), and no ``standalone.json`` is written.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from fastnas.errors import SearchError
from fastnas.run import checkpoint as ckpt
from fastnas.search.searcher import Searcher
from fastnas.tools.rank_metrics import SPARSE_THRESHOLD, rank_report, top_k

STANDALONE_NAME = "standalone.json"
REPORT_NAME = "report.json"
TABLE_NAME = "table.md"
BASE = "base"

# Yu et al.'s heuristics as settings of the supernet training, for ``--compare`` without a list.
HEURISTICS = (
    BASE,
    "bn_affine=true",
    "bn_track=false",
    "method=fairnas",
    "path_dropout=0.2",
    "warmup_epochs=5",
    "lr=0.05",
    "weight_decay=0",
    "epochs=10",
    "init_channels=4",
    "train_portion=0.5",
    "batch_size=128",
    "layers=2",
    "label_smoothing=0.1",
    # The nb201 supernet's (fastnas.spaces.nb201.heuristics); other spaces leave them out.
    "global_dropout=0.2",
    "layer_path_dropout=0.2",
    "ops_on_nodes=true",
    "ofa_kernel=true",
)


# A heuristic the base run has already (SPOS smooths its labels by 0.1) is compared by its opposite.
OPPOSITES = {"label_smoothing=0.1": "label_smoothing=0"}


def heuristics(settings: RankEvalSettings) -> tuple[str, ...]:
    """``HEURISTICS`` as they apply to the runs of ``settings``: less the settings its space
    refuses (another space's supernet options, ``SearchSpace.supernet_options``; a depth
    it fixes), and each one that the base run has already replaced by its opposite
    (``OPPOSITES``) or left out."""
    base = _search_config(settings, Setting(BASE)).to_dict()
    kept = []
    for text in HEURISTICS:
        for option in (text, OPPOSITES.get(text)):
            if option is None:
                break
            try:
                config = _search_config(settings, Setting.parse(option))
            except SearchError:
                break
            if option == BASE or config.to_dict() != base:
                kept.append(option)
                break
    return tuple(kept)


@dataclass
class Setting:
    """A named set of ``SearchConfig`` overrides (``method`` included)."""

    name: str
    overrides: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``name:key=value,key=value``, ``key=value,...`` (named after itself) or ``base``."""
        text = text.strip()
        if text == BASE:
            return cls(BASE)
        name, sep, body = text.partition(":")
        if not sep or "=" in name:
            name, body = text, text
        overrides = {}
        for item in filter(None, (part.strip() for part in body.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise SearchError(f"setting {text!r}: {item!r} is not key=value")
            overrides[key.strip().replace("-", "_")] = _value(value.strip())
        _check_keys(text, overrides)
        return cls(_slug(name), overrides)


def _value(text: str):
    low = text.lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _check_keys(text: str, overrides: dict) -> None:
    from fastnas.search.config import SearchConfig

    fields = {f.name for f in dataclasses.fields(SearchConfig)} - {"extra", "device", "workers", "world_size"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SearchError(f"setting {text!r}: unknown settings {unknown}; settings are fastnas search's options")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "setting"


@dataclass
class RankEvalSettings:
    """What one ``fastnas rank-eval`` runs."""

    method: str = "spos"
    space: str = "nb201"
    dataset: str = "digits"
    data: str | None = None
    architectures: int = 30
    standalone_epochs: int = 8
    standalone: dict = field(default_factory=dict)  # further TrainConfig overrides
    supernet: dict = field(default_factory=dict)  # SearchConfig overrides of every setting
    workers: int = 2
    device: str = "cpu"
    seed: int = 0
    bn_batches: int = 10
    threshold: float = SPARSE_THRESHOLD
    top_k: int = 5
    benchmark: str | None = None  # a NAS-Bench-201 benchmark file: its accuracies instead of stand-alone training
    benchmark_metric: dict = field(default_factory=dict)  # BenchmarkMetric fields (dataset, set, epochs)

    def validate(self) -> None:
        if self.architectures < 2:
            raise SearchError(f"--architectures must be at least 2 to rank anything, got {self.architectures}")
        if self.standalone_epochs < 1 or self.workers < 1:
            raise SearchError("--standalone-epochs and --workers must be at least 1")
        if not self.threshold > 0:
            raise SearchError(f"--threshold must be positive, got {self.threshold}")
        if self.benchmark is not None and self.space != "nb201":
            raise SearchError(f"--benchmark reads NAS-Bench-201, whose cells are the nb201 space's, not {self.space}'s")


def _search_config(settings: RankEvalSettings, setting: Setting):
    from fastnas.search.config import SearchConfig

    values = dict(settings.supernet, **setting.overrides)
    method = values.pop("method", settings.method)
    values.setdefault("space", settings.space)
    values.setdefault("data", settings.data)
    values.setdefault("seed", settings.seed)
    values["device"] = settings.device
    config = SearchConfig.create(method, dataset=settings.dataset, **values)
    if config.search_method.trains_architecture:
        raise SearchError(
            f"setting {setting.name!r}: {method} trains architecture weights, not a supernet to rank with"
        )
    return config


def _sample_architectures(settings: RankEvalSettings, config, info) -> tuple[object, list]:
    from fastnas.search.searcher import build_supernet

    net = build_supernet(config, info["num_classes"], info["in_channels"], config.stages()[-1]["layers"])
    encoding = net.encoding()
    count = min(settings.architectures, encoding.size())
    rng = random.Random(settings.seed)
    seen: dict[tuple, None] = {}
    while len(seen) < count:
        seen.setdefault(encoding.sample(rng), None)
    return encoding, list(seen)


# --- stand-alone training, in worker processes -----------------------------------------------

_DATA: dict = {}


def _train_one(job: dict) -> dict:
    """Train one architecture stand-alone (runs in a worker process)."""
    import torch

    from fastnas.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    config = TrainConfig.create(job["space"], job["dataset"], genotype=job["genotype"], **job["overrides"])
    key = (config.dataset, config.data, config.image_size, config.fraction)
    if key not in _DATA:
        from fastnas.data import load_dataset

        _DATA[key] = load_dataset(
            config.dataset, root=config.data, image_size=config.image_size, fraction=config.fraction
        )
    start = time.perf_counter()
    result = Trainer(config, out_dir=None, dataset=_DATA[key], progress=False).run()
    report = result.report
    return {
        "index": job["index"],
        "test_accuracy": report["test_accuracy"],
        "parameters": report["parameters"],
        "multiply_adds_per_image": report["multiply_adds_per_image"],
        "time_s": time.perf_counter() - start,
    }


# On the 8x8 digits a fuller network reaches 98-99% with almost any cell, within a test image or
# two of the others; a smaller one on a short schedule keeps the architectures apart.
DIGITS_STANDALONE = {"init_channels": 8, "layers": 1}


def _standalone_recipe(settings: RankEvalSettings) -> dict:
    recipe = dict(DIGITS_STANDALONE) if settings.dataset == "digits" else {}
    recipe.update(settings.standalone)
    return dict(recipe, epochs=settings.standalone_epochs, data=settings.data, seed=settings.seed)


def train_standalone(settings: RankEvalSettings, encoding, archs: list, out_dir: str, progress: bool) -> list[dict]:
    """Every architecture's stand-alone result, trained now or read from an earlier run's standalone.json."""
    recipe = _standalone_recipe(settings)
    path = os.path.join(out_dir, STANDALONE_NAME)
    known = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("recipe") == json.loads(json.dumps(recipe)) and saved.get("space") == settings.space:
                known = {r["description"]: r for r in saved["results"] if r.get("dataset") == settings.dataset}
        except (OSError, ValueError, KeyError, TypeError):
            known = {}
    results: dict[int, dict] = {}
    jobs = []
    for i, genes in enumerate(archs):
        description = encoding.describe(genes)
        if description in known:
            results[i] = dict(known[description], genes=list(genes))
            continue
        jobs.append(
            {"index": i, "space": settings.space, "dataset": settings.dataset, "genotype": encoding.to_json(genes),
             "overrides": recipe}
        )  # fmt: skip
    bar = _bar(progress, len(archs), "stand-alone training", "arch")
    if bar is not None:
        bar.update(len(results))
    for r in _run_jobs(jobs, settings.workers) if jobs else ():
        i = r.pop("index")
        genes = archs[i]
        results[i] = {
            "description": encoding.describe(genes),
            "architecture": encoding.to_json(genes),
            "genes": list(genes),
            "dataset": settings.dataset,
            **r,
        }
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{r['test_accuracy']:.3f}", refresh=False)
        # Written as they come: an interrupted run keeps what it trained.
        _write_standalone(path, settings, recipe, known, results)
    if bar is not None:
        bar.close()
    _write_standalone(path, settings, recipe, known, results)
    return [results[i] for i in range(len(archs))]


def _run_jobs(jobs: list, workers: int):
    """Each job's result as it finishes: in this process for one worker, else in spawned processes."""
    if workers <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for job in jobs:
                yield _train_one(job)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(_train_one, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def _write_standalone(path, settings, recipe, known, results) -> None:
    merged = dict(known)
    merged.update({r["description"]: r for r in results.values()})
    payload = {"space": settings.space, "recipe": recipe, "results": list(merged.values())}
    ckpt.atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def _benchmark_record(settings: RankEvalSettings) -> dict:
    from fastnas.spaces.nb201.benchmark import BenchmarkMetric

    return {"file": os.path.abspath(settings.benchmark), **BenchmarkMetric(**settings.benchmark_metric).to_dict()}


def benchmark_standalone(settings: RankEvalSettings, encoding, archs: list) -> list[dict]:
    """Every architecture's accuracy read from the NAS-Bench-201 benchmark file (nothing trained)."""
    from fastnas.spaces.nb201.benchmark import BenchmarkMetric, NB201Benchmark

    bench = NB201Benchmark(settings.benchmark, BenchmarkMetric(**settings.benchmark_metric))
    results = []
    for genes in archs:
        arch = encoding.to_arch(genes)
        results.append(
            {"description": encoding.describe(genes), "architecture": encoding.to_json(genes), "genes": list(genes),
             "benchmark_index": bench.index(arch), "benchmark_accuracy": bench.accuracy(arch)}
        )  # fmt: skip
    return results


# --- supernets ----------------------------------------------------------------------------------


def train_supernet(config, out_dir: str, dataset, progress: bool, label: str):
    """Train the supernet of ``config`` into ``out_dir``; a finished one there with the same settings is kept."""
    path = os.path.join(out_dir, ckpt.CHECKPOINT_NAME)
    if os.path.exists(path):
        state = ckpt.load_checkpoint(out_dir)
        same = state.get("config") == json.loads(json.dumps(config.to_dict()))
        if same and state.get("stage_epoch") == config.epochs:
            return
        os.remove(path)
        log = os.path.join(out_dir, "log.jsonl")
        if os.path.exists(log):
            os.remove(log)
    bar = _bar(progress, config.epochs, f"supernet {label}", "epoch")
    searcher = _EpochBarSearcher(config, out_dir=out_dir, dataset=dataset, progress=bar is not None)
    searcher.bar = bar
    try:
        searcher.run()
    finally:
        if bar is not None:
            bar.close()


class _EpochBarSearcher(Searcher):
    """A search that shows one bar over its epochs instead of a bar per epoch and a line each."""

    bar = None

    def _progress(self, steps: int, epoch: int, epochs: int):
        return None

    def _print_epoch(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record['val_acc']:.3f}", refresh=False)


def score_architectures(run_dir: str, archs: list, settings: RankEvalSettings, dataset, progress: bool, label: str):
    from fastnas.tools.selection import load_supernet

    supernet = load_supernet(run_dir, settings.device, dataset=dataset)
    scorer = supernet.scorer(settings.bn_batches)
    bar = _bar(progress, len(archs), f"supernet scores {label}", "arch")
    scores = []
    for genes in archs:
        scores.append(scorer(genes))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return scores


# --- the run ------------------------------------------------------------------------------------


def rank_eval(settings: RankEvalSettings, out_dir: str, compare: list[Setting] | None = None, progress=True) -> dict:
    """Run the evaluation (one setting, or each of ``compare``); returns the report it writes."""
    from fastnas.data import load_dataset

    settings.validate()
    compare = compare or [Setting(BASE)]
    names = [s.name for s in compare]
    if len(set(names)) != len(names):
        raise SearchError(f"two settings share a name: {names}; name them as name:key=value,...")
    configs = [_search_config(settings, s) for s in compare]
    os.makedirs(out_dir, exist_ok=True)
    base = configs[0]
    train_set, _test, info = load_dataset(
        base.dataset, root=base.data, image_size=base.image_size, fraction=base.fraction, seed=base.seed
    )
    if any((c.space, c.image_size, c.fraction) != (base.space, base.image_size, base.fraction) for c in configs):
        raise SearchError("the compared settings must share the space, the image size and the data fraction")
    encoding, archs = _sample_architectures(settings, base, info)
    start = time.perf_counter()
    if settings.benchmark is not None:
        standalone = benchmark_standalone(settings, encoding, archs)
        accuracies = [r["benchmark_accuracy"] for r in standalone]
    else:
        standalone = train_standalone(settings, encoding, archs, out_dir, progress)
        accuracies = [r["test_accuracy"] for r in standalone]
    standalone_time = time.perf_counter() - start
    rows = []
    for setting, config in zip(compare, configs):
        t0 = time.perf_counter()
        run_dir = os.path.join(out_dir, f"supernet-{setting.name}")
        train_supernet(config, run_dir, (train_set, info), progress, setting.name)
        # The search's own epochs, also when a finished one was reused.
        history = ckpt.load_checkpoint(run_dir).get("history", [])
        train_time = sum(r.get("time_s", 0.0) for r in history) if history else time.perf_counter() - t0
        scores = score_architectures(run_dir, archs, settings, (train_set, info), progress, setting.name)
        predicted = [s["val_acc"] for s in scores]
        metrics = rank_report(accuracies, predicted, settings.threshold, settings.top_k)
        pairs = [
            {"description": r["description"], "architecture": r["architecture"], "standalone_accuracy": a,
             "supernet_accuracy": s["val_acc"], "supernet_loss": s["val_loss"]}
            for r, a, s in zip(standalone, accuracies, scores)
        ]  # fmt: skip
        ckpt.atomic_write_text(
            os.path.join(out_dir, f"pairs-{setting.name}.json"),
            json.dumps({"setting": setting.name, "overrides": setting.overrides, "pairs": pairs}, indent=1) + "\n",
        )
        _plot(
            os.path.join(out_dir, f"scatter-{setting.name}.png"), accuracies, predicted, metrics, setting, config,
            _standalone_label(settings),
        )  # fmt: skip
        rows.append(
            {"setting": setting.name, "overrides": setting.overrides, "method": config.method, **metrics,
             "supernet_time_s": train_time, "supernet_dir": run_dir}
        )  # fmt: skip
    report = {
        "space": settings.space,
        "dataset": settings.dataset,
        "architectures": len(archs),
        **(
            {"benchmark": _benchmark_record(settings)}
            if settings.benchmark is not None
            else {"standalone_recipe": _standalone_recipe(settings)}
        ),
        "standalone_time_s": standalone_time,
        "settings": rows,
        "time_s": time.perf_counter() - start,
    }
    ckpt.atomic_write_text(os.path.join(out_dir, REPORT_NAME), json.dumps(_finite(report), indent=1) + "\n")
    table = format_table(rows)
    if len(rows) > 1:
        ckpt.atomic_write_text(os.path.join(out_dir, TABLE_NAME), table + "\n")
    report["table"] = table
    return report


def _standalone_label(settings: RankEvalSettings) -> str:
    if settings.benchmark is None:
        return "stand-alone test accuracy (%)"
    from fastnas.spaces.nb201.benchmark import BenchmarkMetric

    return f"NAS-Bench-201 {BenchmarkMetric(**settings.benchmark_metric).describe()} (%)"


def _plot(path, standalone, predicted, metrics, setting, config, x_label) -> None:
    from fastnas.tools.scatter import save_scatter

    title = (
        f"{config.method} on {config.space}/{config.dataset} ({setting.name}): tau {metrics['kendall_tau']:.3f}, "
        f"sparse tau {metrics['sparse_kendall_tau']:.3f} (tau-b {metrics['sparse_kendall_tau_b']:.3f}), "
        f"{len(standalone)} architectures"
    )
    save_scatter(
        standalone,
        predicted,
        path,
        title=title,
        x_label=x_label,
        y_label="supernet validation accuracy (%)",
        highlight=top_k(predicted, 3),
    )


def format_table(rows: list[dict]) -> str:
    """A markdown table of the settings' coefficients."""
    lines = [
        "| setting | method | Kendall tau | sparse tau | sparse tau-b | Spearman rho | top-k overlap "
        "| supernet top-3 stand-alone (%) | supernet training (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top3 = ", ".join(f"{100 * a:.1f}" for a in r["supernet_top3_standalone"])
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['kendall_tau']:.3f} | {r['sparse_kendall_tau']:.3f} | "
            f"{r['sparse_kendall_tau_b']:.3f} | {r['spearman_rho']:.3f} | {r['top_k_overlap']:.2f} (k={r['top_k']}) | "
            f"{top3} | {r['supernet_time_s']:.0f} |"
        )
    return "\n".join(lines)


def _finite(value):
    """NaN as null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _bar(progress: bool, total: int, desc: str, unit: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
