"""Search over a trained supernet (``fastnas select``): random search and SPOS' evolution.

Each candidate is scored on the search's validation half by the supernet
running its path, after batch-norm recalibration: the running statistics are
reset and re-estimated on the same images of the training half for every
candidate, as SPOS recalibrates before it evaluates. SPOS (Guo et al., 2020)
recomputes them on 20,000 training images (``SPOS_BN_IMAGES``, the default,
capped by the training half's size, so that the bundled digits use all of
theirs); its released code (megvii-model/SinglePathOneShot,
``src/Search/tester.py`` ``get_cand_err`` with ``search.py``'s
``--max-train-iters 200 --train-batch-size 128``) runs 200 batches of 128, the
next ones of a shuffled loader for each candidate, through batch norms that keep
PyTorch's momentum of 0.1 after resetting them. Here the estimate is a
cumulative average by default (the statistics of exactly those images, which
the paper's "recomputed on 20,000 images" describes; momentum 0.1 would weigh
the last few batches most), and every candidate sees the same images, so that
their scores differ by their paths alone; ``bn_momentum=0.1`` (``fastnas select
--bn-momentum 0.1 --bn-images 25600``) gives the code's estimate.
A supernet whose batch norms keep no running statistics (``bn_track`` off)
normalises every batch by itself and needs none.

Constraints (``fastnas.search.sampling.Constraint``) are measured on the
network ``fastnas train`` would train, for the search's dataset.

The evolution is SPOS' (megvii-model/SinglePathOneShot ``src/Search/search.py``):
a population of 50 random architectures that meet the constraint; for 20
generations the 10 best seen so far breed 25 mutations (each gene redrawn with
probability 0.1) and 25 crossovers (each gene from either parent), the
population is filled up with random architectures, and no architecture is
scored twice. Unlike the original, the last generation also competes for the
top.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnas.data import info_field
from fastnas.errors import SearchError
from fastnas.run import checkpoint as ckpt
from fastnas.search.sampling import ArchitectureCosts, Constraint

STRATEGIES = ("random", "evolution")
# Training images SPOS recomputes the batch-norm statistics on before it scores an architecture.
SPOS_BN_IMAGES = 20_000


# --- scoring ----------------------------------------------------------------------------------


def _batch_norms(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(net: nn.Module, batches, momentum: float | None = None) -> None:
    """Reset every batch norm's running statistics, then estimate them afresh on ``batches``
    (in training mode, nothing learned): a cumulative average over them (``momentum``
    None), or an exponential one with that momentum (SPOS' code: PyTorch's 0.1)."""
    from fastnas.nn.mixed_op import MixedOp

    norms = _batch_norms(net)
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    edges = [m for m in net.modules() if isinstance(m, MixedOp)]
    memories = [m.memory for m in edges]
    was_training = net.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = momentum
        # The fused edge updates with the momentum its plan read; the modules honour None.
        for m in edges:
            m.memory = "sum"
        net.train()
        for x in batches:
            net(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, memory in zip(edges, memories):
            m.memory = memory
        net.train(was_training)


@torch.no_grad()
def evaluate_path(net: nn.Module, batches) -> tuple[float, float]:
    """(accuracy, mean loss) of the network as it is set, in eval mode, on ``batches`` of (x, y)."""
    was_training = net.training
    net.eval()
    correct = loss = 0.0
    n = 0
    try:
        for x, y in batches:
            logits = net(x)
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            n += len(y)
    finally:
        net.train(was_training)
    return correct / max(n, 1), loss / max(n, 1)


class SupernetScorer:
    """Scores architectures with a trained supernet: its path, recalibrated batch norms, validation accuracy."""

    def __init__(self, net: nn.Module, recalibration_batches, validation_batches, bn_momentum: float | None = None):
        self.net = net
        self.encoding = net.encoding()
        self.recalibration = list(recalibration_batches)
        self.validation = list(validation_batches)
        self.bn_momentum = bn_momentum
        self.evaluated = 0

    def __call__(self, genes) -> dict:
        self.net.set_path(self.encoding.to_path(genes))
        recalibrate_batch_norm(self.net, self.recalibration, self.bn_momentum)
        acc, loss = evaluate_path(self.net, self.validation)
        self.evaluated += 1
        return {"val_acc": acc, "val_loss": loss}


# --- the supernet of a run ---------------------------------------------------------------------


@dataclass
class TrainedSupernet:
    """A single-path or one-shot search's supernet, loaded with its data and split."""

    run_dir: str
    config: object
    net: nn.Module
    train_set: object
    info: dict
    train_idx: list
    val_idx: list
    epochs_done: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def batches(self, indices, batch_size: int, count: int | None, seed: int, labels: bool, images: int | None = None):
        """The first ``count`` batches (all of them with None) of ``indices`` in a seeded order, on the device;
        with ``images``, of the first that many images of that order only.

        Every image counts: a last batch too small to normalise joins the one before.
        """
        from torch.utils.data import DataLoader, Subset

        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
        if images is not None:
            order = order[:images]
        loader = DataLoader(Subset(self.train_set, [indices[i] for i in order]), batch_size=batch_size)
        out = []
        for x, y in loader:
            if count is not None and len(out) >= count:
                break
            if len(y) < 2 and out:
                px, py = out.pop()
                x, y = torch.cat([px, x]), torch.cat([py, y])
            out.append((x, y))
        if not out or len(out[0][1]) < 2:
            raise SearchError(f"the {len(indices)}-image split is too small for batch norm")
        return [(x.to(self.device), y.to(self.device)) if labels else x.to(self.device) for x, y in out]

    def scorer(
        self,
        bn_batches: int | None = None,
        val_images: int | None = None,
        batch_size: int | None = None,
        bn_images: int = SPOS_BN_IMAGES,
        bn_momentum: float | None = None,
    ):
        """A ``SupernetScorer`` whose recalibration runs ``bn_batches`` training batches, or (None)
        the first ``bn_images`` images of the training half (all of them in a smaller half)."""
        cfg = self.config
        batch_size = batch_size or cfg.batch_size
        images = None if bn_batches is not None else bn_images
        recal = self.batches(self.train_idx, batch_size, bn_batches, cfg.seed + 11, labels=False, images=images)
        val_idx = self.val_idx if val_images is None else self.val_idx[:val_images]
        val = self.batches(val_idx, batch_size, None, cfg.seed + 12, labels=True)
        return SupernetScorer(self.net, recal, val, bn_momentum)


def load_supernet(run_dir: str, device: str = "cpu", dataset=None) -> TrainedSupernet:
    """The trained supernet of the single-path or one-shot search in ``run_dir``; SearchError otherwise."""
    from fastnas.run.data import search_split
    from fastnas.search.config import SearchConfig
    from fastnas.search.searcher import build_supernet

    if not os.path.isdir(run_dir):
        raise SearchError(f"{run_dir} is not a folder; give the output folder of a spos, fairnas or oneshot search")
    state = ckpt.load_checkpoint(run_dir)
    try:
        config = SearchConfig.from_dict(state["config"])
        method = config.search_method
    except (KeyError, TypeError, SearchError) as exc:
        raise SearchError(f"the checkpoint in {run_dir} has no valid search settings ({exc})") from None
    if method.trains_architecture:
        raise SearchError(
            f"{run_dir} holds a {config.method} search, which trains architecture weights and has no "
            f"supernet to select from; its result is {run_dir}/genotype.json (fastnas train {run_dir})"
        )
    if dataset is None:
        from fastnas.data import load_dataset

        train_set, _test, info = load_dataset(
            config.dataset, root=config.data, image_size=config.image_size, fraction=config.fraction, seed=config.seed
        )
    else:
        train_set, info = dataset
    stage = config.stages()[-1]
    net = build_supernet(config, info_field(info, "num_classes"), info_field(info, "in_channels"), stage["layers"])
    try:
        net.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise SearchError(
            f"the checkpoint in {run_dir} does not fit its supernet ({str(exc).splitlines()[0]})"
        ) from None
    dev = torch.device(device)
    net.to(dev)
    train_idx, val_idx = search_split(train_set, config)
    info = {k: info_field(info, k) for k in ("num_classes", "in_channels", "image_size")}
    return TrainedSupernet(run_dir, config, net, train_set, info, train_idx, val_idx, int(state["stage_epoch"]), dev)


# --- the strategies ---------------------------------------------------------------------------


@dataclass
class SelectSettings:
    """What ``fastnas select`` runs. The evolution's numbers are SPOS'."""

    strategy: str = "evolution"
    candidates: int = 1000
    population: int = 50
    generations: int = 20
    parents: int = 10
    mutations: int = 25
    mutation_prob: float = 0.1
    crossovers: int = 25
    constraint: str | None = None
    constraint_min: float | None = None
    constraint_max: float | None = None
    bn_batches: int | None = None
    bn_images: int = SPOS_BN_IMAGES
    bn_momentum: float | None = None
    val_images: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SearchError(f"unknown --strategy {self.strategy!r}; choose {' or '.join(STRATEGIES)}")
        for name in ("candidates", "population", "generations", "parents"):
            if getattr(self, name) < 1:
                raise SearchError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.mutations < 0 or self.crossovers < 0 or (self.bn_batches or 0) < 0:
            raise SearchError("--mutations, --crossovers and --bn-batches must not be negative")
        if self.bn_images < 2:
            raise SearchError(f"--bn-images must be at least 2 (batch norm needs two images), got {self.bn_images}")
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            raise SearchError(f"--bn-momentum must be in (0, 1], got {self.bn_momentum}")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise SearchError(f"--mutation-prob must be in [0, 1], got {self.mutation_prob}")
        if self.constraint is not None:
            Constraint(self.constraint, self.constraint_min, self.constraint_max)


class _Search:
    """Candidates scored once each, the legal ones under the constraint, in the order seen."""

    def __init__(self, encoding, score, constraint, costs, rng, bar=None):
        self.encoding, self.score, self.constraint, self.costs, self.rng = encoding, score, constraint, costs, rng
        self.seen: dict[tuple, dict | None] = {}
        self.bar = bar

    def try_add(self, genes) -> bool:
        """Score ``genes`` if new and legal; True if it was."""
        if genes in self.seen:
            return False
        record = {"genes": list(genes)}
        if self.constraint is not None:
            value = self.costs(genes, self.constraint.kind)
            record[self.constraint.kind] = value
            if not self.constraint.holds(value):
                self.seen[genes] = None
                return False
        record.update(self.score(genes))
        self.seen[genes] = record
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(best=f"{max(r['val_acc'] for r in self.scored()):.3f}", refresh=False)
        return True

    def scored(self) -> list[dict]:
        return [r for r in self.seen.values() if r is not None]

    def random(self, count: int, max_tries: int) -> list:
        out = []
        for _ in range(max_tries):
            if len(out) >= count:
                break
            genes = self.encoding.sample(self.rng)
            if self.try_add(genes):
                out.append(genes)
        return out


def _ranked(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (-r["val_acc"], r["val_loss"]))


def random_search(search: _Search, settings: SelectSettings) -> list[dict]:
    count = min(settings.candidates, search.encoding.size())
    search.random(count, max_tries=50 * count)
    return _ranked(search.scored())


def evolution_search(search: _Search, settings: SelectSettings, log=None) -> list[dict]:
    s, enc, rng = settings, search.encoding, search.rng
    population = search.random(s.population, max_tries=50 * s.population)
    top: list = []

    def update_top(candidates):
        nonlocal top
        pool = {g: search.seen[g] for g in list(top) + list(candidates)}
        top = [tuple(r["genes"]) for r in _ranked(list(pool.values()))][: s.parents]

    for generation in range(s.generations):
        update_top(population)
        if log is not None:
            log(generation, [search.seen[g] for g in top])
        if not top:
            break
        children = []
        for _ in range(10 * s.mutations):
            if len(children) >= s.mutations:
                break
            genes = enc.mutate(top[rng.randrange(len(top))], s.mutation_prob, rng)
            if search.try_add(genes):
                children.append(genes)
        crossed = []
        for _ in range(10 * s.crossovers):
            if len(crossed) >= s.crossovers:
                break
            genes = enc.crossover(top[rng.randrange(len(top))], top[rng.randrange(len(top))], rng)
            if search.try_add(genes):
                crossed.append(genes)
        population = children + crossed
        population += search.random(s.population - len(population), max_tries=50 * s.population)
    update_top(population)
    return _ranked(search.scored())


@dataclass
class SelectResult:
    ranked: list
    best: dict
    settings: dict
    evaluated: int
    time_s: float
    files: list = field(default_factory=list)


def select(
    run_dir: str,
    settings: SelectSettings,
    out_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    supernet: TrainedSupernet | None = None,
) -> SelectResult:
    """Search the trained supernet of ``run_dir``; write the ranked candidates and the best genotype."""
    settings.validate()
    supernet = supernet or load_supernet(run_dir, device)
    encoding = supernet.net.encoding()
    constraint = None
    costs = None
    if settings.constraint is not None:
        constraint = Constraint(settings.constraint, settings.constraint_min, settings.constraint_max)
        costs = ArchitectureCosts(encoding, supernet.config.dataset, supernet.info, device)
    scorer = supernet.scorer(
        settings.bn_batches, settings.val_images, bn_images=settings.bn_images, bn_momentum=settings.bn_momentum
    )
    total = (
        min(settings.candidates, encoding.size())
        if settings.strategy == "random"
        else settings.population * (settings.generations + 1)
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"select ({settings.strategy})", unit="arch", dynamic_ncols=True)
    rng = random.Random(settings.seed)
    search = _Search(encoding, scorer, constraint, costs, rng, bar)
    start = time.perf_counter()
    try:
        if settings.strategy == "random":
            ranked = random_search(search, settings)
        else:
            ranked = evolution_search(search, settings)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    if not ranked:
        raise SearchError("no architecture met the constraint; loosen --constraint-max or --constraint-min")
    for i, r in enumerate(ranked, start=1):
        r["rank"] = i
        r["architecture"] = encoding.to_json(tuple(r["genes"]))
        r["description"] = encoding.describe(tuple(r["genes"]))
    best = ranked[0]
    # The images the recalibration actually ran on (bn_images is capped by the training half).
    recalibration = {"bn_images_used": sum(len(x) for x in scorer.recalibration)}
    result = SelectResult(ranked, best, {**asdict(settings), **recalibration}, scorer.evaluated, elapsed)
    out_dir = out_dir or run_dir
    if out_dir:
        result.files = write_selection(out_dir, supernet, result)
    return result


GENOTYPE_NAME = "genotype.json"
PLOT_NAME = "cells.png"


def write_selection(out_dir: str, supernet: TrainedSupernet, result: SelectResult) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    strategy = result.settings["strategy"]
    name = f"select-{strategy}.json"
    payload = {
        "run": os.path.abspath(supernet.run_dir),
        "method": supernet.config.method,
        "space": supernet.config.space,
        "settings": result.settings,
        "supernet_epochs": supernet.epochs_done,
        "evaluated": result.evaluated,
        "time_s": result.time_s,
        "best": result.best,
        "ranked": result.ranked,
    }
    ckpt.atomic_write_text(os.path.join(out_dir, name), json.dumps(payload, indent=1) + "\n")
    ckpt.atomic_write_text(
        os.path.join(out_dir, GENOTYPE_NAME), json.dumps(result.best["architecture"], indent=2) + "\n"
    )
    files = [name, GENOTYPE_NAME]
    from fastnas.spaces import get_space

    space = get_space(supernet.config.space)
    try:
        space.plot(space.from_json(result.best["architecture"]), os.path.join(out_dir, PLOT_NAME))
        files.append(PLOT_NAME)
    except NotImplementedError:
        pass  # a space without pictures (ShuffleNet's list of blocks)
    return files
