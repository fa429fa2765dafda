"""Fitting LA-DARTS' latency predictor (``fastnas latency-model``): measure architectures, fit, check.

``fit_latency_model`` draws architectures of both kinds (``fastnas.search.latency``
says what they are), builds each one's evaluation network
(``fastnas.train.build_eval_network``), measures its median latency on the
device and fits the regressor, reporting the held-out error of each kind.
"""

from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Callable, Sequence

import torch

from fastnas.search.latency import (
    DERIVE_TEMPERATURE,
    KINDS,
    LatencyModel,
    LatencyModelError,
    derive_genotype,
    encode_genotype,
    encode_weights,
    fit_regressor,
    random_genotype,
    random_relaxed_weights,
    relative_error,
)

SPACES = ("darts",)
# (classes, image channels) of each dataset's evaluation network; ImageNet folders
# vary in classes, so the ImageNet classifier is measured at ImageNet's 1000.
DATASET_INPUTS = {"digits": (10, 3), "cifar10": (10, 3), "cifar100": (100, 3), "imagenet": (1000, 3)}
# What the measurement of one architecture repeats: a short warm-up, then the median
# of a few runs; a model is fitted on hundreds of them, so each must be quick.
WARMUP = 3
REPEATS = 10
ROUNDS = 3
# Standard deviations of the random architecture logits of the relaxed samples: from
# nearly uniform edges whose derived operation hangs on small differences (a search's
# early epochs) to nearly one-hot ones (its late epochs).
RELAXED_SCALES = (0.03, 0.1, 0.3, 1.0, 3.0)


def measure_architectures(
    genotypes,
    space: str,
    dataset: str,
    device,
    batch_size: int = 1,
    network: dict | None = None,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    progress: Callable[[int], None] | None = None,
    clock: str = "wall",
    rounds: int = ROUNDS,
) -> tuple[list[float], dict]:
    """The inference latency (ms) of each genotype's evaluation network on ``device``.

    Each architecture is measured once per round (warm-up, then the median of
    ``repeats`` runs), the rounds passing over all architectures in turn, and its
    latency is the median over the rounds: a slow spell of the machine then
    touches one round of many architectures rather than all rounds of a few.
    ``network`` overrides the evaluation network's ``TrainConfig`` fields
    (init_channels, layers, image_size); returns the latencies and the network settings used.
    """
    from fastnas.spaces.darts import genotype_to_dict
    from fastnas.train import TrainConfig, build_eval_network
    from fastnas.train.report import measure_latency

    classes, channels = DATASET_INPUTS[dataset]
    overrides = dict(network or {})
    configs = [
        TrainConfig.create(space, dataset, genotype=genotype_to_dict(g), auxiliary=False, **overrides)
        for g in genotypes
    ]
    if not configs:
        return [], {}
    size = configs[0].image_size or (224 if dataset == "imagenet" else 32)
    settings = dict(init_channels=configs[0].init_channels, layers=configs[0].layers, image_size=size)
    measured = [[] for _ in configs]
    for r in range(rounds):
        for i, config in enumerate(configs):
            net = build_eval_network(config, classes, channels).to(device)
            # The very first measurement also warms the allocator and the caches up.
            for _ in range(2 if r == i == 0 else 1):
                result = measure_latency(
                    net, batch_size, channels, size, device, contextlib.nullcontext,
                    warmup=warmup, min_repeats=repeats, max_repeats=repeats, budget_s=0.0, clock=clock,
                )  # fmt: skip
            measured[i].append(result["latency_ms"])
            if progress is not None:
                progress(1)
    return [statistics.median(m) for m in measured], settings


def fit_latency_model(
    space: str = "darts",
    dataset: str = "digits",
    device="cpu",
    samples: int = 500,
    batch_size: int = 1,
    seed: int = 0,
    network: dict | None = None,
    candidates: Sequence[str] | None = None,
    steps: int = 4,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    progress: bool = False,
    iterations: int = 3000,
    clock: str = "wall",
    rounds: int = ROUNDS,
    relaxed_samples: int | None = None,
) -> LatencyModel:
    """Measure architectures of both kinds on ``device``, fit and check the regressor.

    ``samples`` discrete architectures drawn uniformly and ``relaxed_samples``
    (default: as many) relaxed ones, softmaxes of random logits at the scales
    ``RELAXED_SCALES`` in turn, each measured as the genotype it derives. The
    model's ``heldout_errors`` give the held-out error of each kind.
    """
    from fastnas.spaces.darts import DARTS_PRIMITIVES

    if space not in SPACES:
        raise LatencyModelError(f"latency models are made for the {', '.join(SPACES)} space, not {space!r}")
    if dataset not in DATASET_INPUTS:
        raise LatencyModelError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_INPUTS)}")
    candidates = list(candidates or DARTS_PRIMITIVES)
    relaxed_samples = samples if relaxed_samples is None else relaxed_samples
    if relaxed_samples < 0:
        raise LatencyModelError(f"--relaxed-samples must be >= 0, got {relaxed_samples}")
    rng = random.Random(seed)
    genotypes = [random_genotype(rng, candidates, steps) for _ in range(samples)]
    encodings = [encode_genotype(g, candidates, steps) for g in genotypes]
    generator = torch.Generator().manual_seed(seed)
    for i in range(relaxed_samples):
        weights = random_relaxed_weights(generator, len(candidates), steps, RELAXED_SCALES[i % len(RELAXED_SCALES)])
        genotypes.append(derive_genotype(weights, candidates, steps))
        encodings.append(encode_weights(weights))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(genotypes) * rounds, desc="measuring", unit="arch", dynamic_ncols=True)
    try:
        latencies, settings = measure_architectures(
            genotypes,
            space,
            dataset,
            device,
            batch_size,
            network,
            warmup,
            repeats,
            bar.update if bar else None,
            clock,
            rounds,
        )
    finally:
        if bar is not None:
            bar.close()
    encodings = torch.stack(encodings)
    relaxed = torch.arange(len(genotypes)) >= samples
    y = torch.tensor(latencies, dtype=torch.float64)
    if not torch.isfinite(y).all() or (y <= 0).any():
        raise LatencyModelError("a measured latency is not a positive number; measure again")
    regressor, error, test = fit_regressor(
        encodings, y, len(candidates), steps, seed, iterations=iterations, strata=relaxed,
        derive_temperature=DERIVE_TEMPERATURE, none_index=candidates.index("none") if "none" in candidates else None,
    )  # fmt: skip
    errors = {}
    for kind, member in zip(KINDS, (~relaxed, relaxed)):
        rows = test[member[test]]
        if len(rows):
            errors[kind] = relative_error(regressor, encodings[rows], y[rows])
    device = torch.device(device)
    return LatencyModel(
        regressor=regressor,
        space=space,
        candidates=candidates,
        steps=steps,
        dataset=dataset,
        device=str(device),
        network=settings,
        batch_size=batch_size,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        clock=clock,
        heldout_relative_error=error,
        samples=samples,
        data={"encodings": encodings, "latency_ms": y, "relaxed": relaxed},
        heldout_errors=errors,
        relaxed_samples=relaxed_samples,
    )


def describe(model: LatencyModel) -> str:
    net = model.network
    relaxed = f" and {model.relaxed_samples} relaxed ones" if model.relaxed_samples else ""
    per_kind = ", ".join(
        f"{kind} {100 * model.heldout_errors[kind]:.1f}%" for kind in KINDS if kind in model.heldout_errors
    )
    threads = f", {model.threads} CPU thread{'s' if model.threads > 1 else ''}" if model.threads else ""
    clock = ", CPU-time clock" if model.clock == "cpu" else ""
    return (
        f"latency model of the {model.space} space's {model.dataset} network (C={net.get('init_channels')}, "
        f"{net.get('layers')} cells, {net.get('image_size')}x{net.get('image_size')}, batch {model.batch_size}) on "
        f"{model.device}{threads}{clock}: {model.samples} architectures{relaxed}, held-out mean relative error "
        f"{100 * model.heldout_relative_error:.1f}%" + (f" ({per_kind})" if per_kind else "")
    )
