"""A differentiable latency predictor for LA-DARTS (Xu et al., 2020).

An architecture of the DARTS space is encoded as one row per edge of each cell
over the candidate operations: the one-hot of its operation for the two edges
a node keeps, the one-hot of ``none`` for the others. A small regressor
(``LatencyRegressor``, linear in operation counts) maps that encoding to the measured inference
latency of the architecture's evaluation network. During the search the same
regressor reads the relaxed architecture, the softmax of the architecture
parameters in the same rows (``encode_weights``), so the predicted latency is a
differentiable function of the architecture.

A relaxed architecture is not a network: what the search will turn it into is
the genotype it derives (each node's two strongest edges, each with its best
candidate other than ``none``). The regressor is therefore trained on both
kinds of encoding, each labelled with the latency of the network it stands
for: discrete architectures drawn uniformly, and relaxed ones (softmax of random
logits at several scales, ``random_relaxed_weights``) labelled with the
measured latency of the genotype they derive. It reads an encoding through a
soft version of that derivation (``soft_derive``: a sharp softmax in place of
each argmax and of each node's top two), which leaves a discrete encoding as it
is and keeps the prediction differentiable.

``fastnas.tools.latency_fit.fit_latency_model`` samples architectures of both kinds, builds each one's
evaluation network (``fastnas.train.build_eval_network``, the network ``fastnas
train`` trains on that dataset), measures its median latency on the device
after a warm-up, fits the regressor on most of each kind and reports its mean
relative error on the rest of each kind. The file it writes loads with
``torch.load(weights_only=True)``; ``LatencyModel.load`` checks it and raises a
one-line ``LatencyModelError`` for a missing, corrupt or foreign file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastnas.errors import SearchError

FORMAT = "fastnas-latency-model"
VERSION = 1
# No hidden layer: on the digits network's 400 measured architectures (200 of each kind)
# a linear map of the derived operation counts held out 4-5% error on discrete and 6-8%
# on relaxed ones, a 2x128 MLP 8% and 10-11% (three splits); latency is close to a sum
# over the operations run, and the MLP overfits.
HIDDEN = ()
HELDOUT_FRACTION = 0.2
# Temperature, in log-weight units, of the regressor's soft derivation: differences of
# a few hundredths between two candidates decide which one the derived genotype keeps.
DERIVE_TEMPERATURE = 0.01
KINDS = ("discrete", "relaxed")


class LatencyModelError(SearchError):
    """A latency model file is missing, unreadable or does not fit the search."""


# --- encodings ------------------------------------------------------------------------


def edge_count(steps: int) -> int:
    return sum(2 + i for i in range(steps))


def encode_genotype(genotype, candidates: Sequence[str], steps: int) -> torch.Tensor:
    """(2 * edges * K,) float32: per cell and edge, the one-hot of the operation the genotype
    puts there, or of ``none`` for an edge it leaves out (a zero row without ``none``)."""
    candidates = list(candidates)
    rows = []
    for cell in ("normal", "reduce"):
        enc = torch.zeros(edge_count(steps), len(candidates))
        kept = {}
        for pos, (op, j) in enumerate(getattr(genotype, cell)):
            node = pos // 2
            kept[sum(2 + i for i in range(node)) + j] = op
        for e in range(edge_count(steps)):
            op = kept.get(e, "none")
            if op in candidates:
                enc[e, candidates.index(op)] = 1.0
            elif op != "none":
                raise LatencyModelError(f"operation {op!r} is not one of the latency model's candidates {candidates}")
        rows.append(enc.flatten())
    return torch.cat(rows)


def encode_weights(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The relaxed encoding: the softmaxed architecture weights of the normal and the
    reduction cell ((edges, K) each), flattened in ``encode_genotype``'s order."""
    return torch.cat([weights["normal"].flatten(), weights["reduce"].flatten()])


def random_relaxed_weights(generator: torch.Generator, candidates: int, steps: int, scale: float) -> dict:
    """Softmaxed random logits (normal, N(0, scale^2)) over every candidate of every edge, per cell."""
    return {
        cell: torch.softmax(scale * torch.randn(edge_count(steps), candidates, generator=generator), dim=-1)
        for cell in ("normal", "reduce")
    }


def derive_genotype(weights: dict[str, torch.Tensor], candidates: Sequence[str], steps: int = 4):
    """The genotype a search derives from relaxed ``weights`` (DARTS' rule, ``parse_cell``)."""
    from fastnas.spaces.darts import Genotype, parse_cell

    per_edge = [list(candidates)] * edge_count(steps)
    cells = {cell: parse_cell(weights[cell].tolist(), per_edge, steps) for cell in ("normal", "reduce")}
    concat = list(range(2, 2 + steps))
    return Genotype(normal=cells["normal"], normal_concat=concat, reduce=cells["reduce"], reduce_concat=concat)


def random_genotype(rng: random.Random, candidates: Sequence[str], steps: int = 4):
    """A genotype drawn uniformly: each node takes two distinct inputs, each edge an operation other than none."""
    from fastnas.spaces.darts import Genotype

    ops = [c for c in candidates if c != "none"]
    cells = {}
    for cell in ("normal", "reduce"):
        gene = []
        for node in range(steps):
            for j in sorted(rng.sample(range(2 + node), 2)):
                gene.append((rng.choice(ops), j))
        cells[cell] = gene
    concat = list(range(2, 2 + steps))
    return Genotype(normal=cells["normal"], normal_concat=concat, reduce=cells["reduce"], reduce_concat=concat)


# --- the regressor ----------------------------------------------------------------------


def edge_groups(steps: int) -> torch.Tensor:
    """(edges,) 0 for an edge from a cell input (stride 2 in a reduction cell), 1 from a node."""
    return torch.tensor([0 if j < 2 else 1 for node in range(steps) for j in range(2 + node)])


def soft_derive(
    encoding: torch.Tensor, steps: int, candidates: int, none_index: int | None, temperature: float
) -> torch.Tensor:
    """The derived genotype's encoding, softened: (..., 2 * edges * K) -> the same shape.

    DARTS derives a genotype by keeping each node's two strongest incoming edges
    (an edge's strength: its best weight outside ``none``) with their best
    candidate. Here each argmax is a softmax of the log-weights at
    ``temperature``, and an edge is kept in the measure ``sigmoid((s - m) / T)``,
    ``s`` its log-strength and ``m`` midway between the node's second and third
    strongest; the rest of its row goes to ``none``. A discrete encoding (one-hot
    rows, ``none`` on the edges left out) comes back unchanged up to ``exp(-1/T)``.
    """
    lead = encoding.shape[:-1]
    w = encoding.reshape(*lead, 2, edge_count(steps), candidates)
    log_w = w.clamp_min(1e-12).log()
    if none_index is not None:
        not_none = torch.ones(candidates, dtype=torch.bool, device=w.device)
        not_none[none_index] = False
        log_w = log_w.masked_fill(~not_none, float("-inf"))
    choice = torch.softmax(log_w / temperature, dim=-1)
    strength = log_w.amax(-1)
    keep, start = [], 0
    for node in range(steps):
        s = strength[..., start : start + 2 + node]
        if node == 0:  # two inputs: both kept
            keep.append(torch.ones_like(s))
        else:
            second, third = s.topk(3, dim=-1).values.unbind(-1)[1:]
            keep.append(torch.sigmoid((s - ((second + third) / 2).unsqueeze(-1)) / temperature))
        start += 2 + node
    keep = torch.cat(keep, dim=-1).unsqueeze(-1)
    derived = keep * choice
    if none_index is not None:
        derived = derived.masked_fill(~not_none, 0.0) + (1.0 - keep) * (~not_none).to(derived.dtype)
    return derived.flatten(-3)


class LatencyRegressor(nn.Module):
    """A regressor from an architecture encoding to latency in milliseconds: linear in the
    operation counts below, or a multi-layer perceptron of them with ``hidden`` layers.

    It reads the encoding ((2 * edges * K,), ``encode_genotype`` or
    ``encode_weights``) through a fixed first layer that counts each operation
    per cell and per kind of edge (from a cell input, which strides in a
    reduction cell, or from a node): latency depends on which operations run
    at which resolution far more than on which edge holds them, and 4K counts
    are learnt from a few hundred measured architectures where 2 * edges * K
    one-hot inputs would not be. The counts are sums of the encoding, so the
    predicted latency of a relaxed architecture stays differentiable. It
    predicts in units of ``scale`` (the mean measured latency), so the same
    initialisation and learning rate serve any device.

    With ``derive_temperature`` it counts the operations of the derived
    architecture (``soft_derive``; ``none_index``: the column of ``none``, if a
    candidate) rather than the encoding's own weights: the latency of a relaxed
    architecture is that of the genotype it derives.
    """

    def __init__(
        self,
        steps: int,
        candidates: int,
        hidden: Sequence[int] = HIDDEN,
        scale: float = 1.0,
        derive_temperature: float | None = None,
        none_index: int | None = None,
    ):
        super().__init__()
        self.steps, self.candidates = steps, candidates
        self.derive_temperature, self.none_index = derive_temperature, none_index
        groups = edge_groups(steps)
        self.register_buffer("pool", torch.stack([(groups == g).float() for g in (0, 1)]))  # (2, edges)
        layers, width = [], 4 * candidates
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def features(self, encoding: torch.Tensor) -> torch.Tensor:
        """(..., 4K): operation counts per cell and kind of edge."""
        if self.derive_temperature is not None:
            encoding = soft_derive(encoding, self.steps, self.candidates, self.none_index, self.derive_temperature)
        lead = encoding.shape[:-1]
        cells = encoding.reshape(*lead, 2, self.pool.shape[1], self.candidates)
        return torch.einsum("ge,...cek->...cgk", self.pool.to(cells.dtype), cells).flatten(-3)

    def forward(self, encoding: torch.Tensor) -> torch.Tensor:
        """Predicted latency (ms) of each encoding, (..., 2 * edges * K) -> (...)."""
        return self.mlp(self.features(encoding)).squeeze(-1) * self.scale


@dataclass
class LatencyModel:
    """A fitted regressor and what it was measured on."""

    regressor: LatencyRegressor
    space: str
    candidates: list[str]
    steps: int
    dataset: str
    device: str
    network: dict
    batch_size: int
    threads: int | None
    clock: str
    heldout_relative_error: float
    samples: int
    data: dict = field(default_factory=dict)  # the measurements: encodings, latency_ms, relaxed
    # Held-out mean relative error per kind of encoding ("discrete", "relaxed"), and the
    # relaxed architectures measured (0 in models fitted on discrete ones only).
    heldout_errors: dict = field(default_factory=dict)
    relaxed_samples: int = 0

    def predict(self, encoding: torch.Tensor) -> torch.Tensor:
        return self.regressor(encoding.to(self.regressor.scale.device, torch.float32))

    def predict_genotype(self, genotype) -> float:
        with torch.no_grad():
            return float(self.predict(encode_genotype(genotype, self.candidates, self.steps)))

    def check_fits(self, space: str, candidates: Sequence[str], steps: int = 4, where: str = "the search") -> None:
        """Raise LatencyModelError unless the model encodes architectures of this space and candidates."""
        if space != self.space or list(candidates) != self.candidates or steps != self.steps:
            raise LatencyModelError(
                f"the latency model was fitted on the {self.space} space with candidates {self.candidates} and "
                f"{self.steps} nodes per cell, but {where} uses the {space} space with {list(candidates)} and "
                f"{steps}; make one with fastnas latency-model --space {space}"
            )

    def save(self, path: str) -> None:
        from fastnas.run.checkpoint import atomic_write

        state = {
            "format": FORMAT,
            "version": VERSION,
            "space": self.space,
            "candidates": list(self.candidates),
            "steps": self.steps,
            "dataset": self.dataset,
            "device": self.device,
            "network": dict(self.network),
            "batch_size": self.batch_size,
            "threads": self.threads,
            "clock": self.clock,
            "heldout_relative_error": self.heldout_relative_error,
            "heldout_errors": {k: float(v) for k, v in self.heldout_errors.items()},
            "samples": self.samples,
            "relaxed_samples": self.relaxed_samples,
            "derive_temperature": self.regressor.derive_temperature,
            "hidden": [m.out_features for m in self.regressor.mlp if isinstance(m, nn.Linear)][:-1],
            "regressor": {k: v.detach().cpu() for k, v in self.regressor.state_dict().items()},
            "data": {k: v.cpu() for k, v in self.data.items()},
        }
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: str, device="cpu") -> LatencyModel:
        """Read a model written by ``save``; LatencyModelError naming the problem otherwise."""
        if not os.path.isfile(path):
            raise LatencyModelError(
                f"no latency model at {path}; make one with fastnas latency-model --space darts --device cpu"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            raise LatencyModelError(
                f"latency model {path} is corrupt, truncated or not a latency model ({type(exc).__name__})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise LatencyModelError(f"{path} is not a fastnas latency model (made by fastnas latency-model)")
        if state.get("version") != VERSION:
            raise LatencyModelError(
                f"latency model {path} has format version {state.get('version')}; this fastnas reads version {VERSION}"
            )
        try:
            steps, candidates = int(state["steps"]), list(state["candidates"])
            # Models fitted before the relaxed training count the encoding's own weights.
            temperature = state.get("derive_temperature")
            regressor = LatencyRegressor(
                steps,
                len(candidates),
                list(state["hidden"]),
                derive_temperature=None if temperature is None else float(temperature),
                none_index=candidates.index("none") if "none" in candidates else None,
            )
            regressor.load_state_dict(state["regressor"])
            model = cls(
                regressor=regressor.to(device).eval(),
                space=str(state["space"]),
                candidates=[str(c) for c in state["candidates"]],
                steps=int(state["steps"]),
                dataset=str(state["dataset"]),
                device=str(state["device"]),
                network=dict(state["network"]),
                batch_size=int(state["batch_size"]),
                threads=state["threads"],
                clock=str(state["clock"]),
                heldout_relative_error=float(state["heldout_relative_error"]),
                samples=int(state["samples"]),
                data=dict(state.get("data", {})),
                heldout_errors={str(k): float(v) for k, v in dict(state.get("heldout_errors", {})).items()},
                relaxed_samples=int(state.get("relaxed_samples", 0)),
            )
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise LatencyModelError(
                f"latency model {path} is damaged or from another version ({str(exc).splitlines()[0]})"
            ) from None
        for p in regressor.parameters():
            p.requires_grad_(False)
        return model


def file_digest(path: str) -> str:
    """SHA-256 of a file: a resumed search must use the very model it started with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- fitting --------------------------------------------------------------------------------


def fit_regressor(
    encodings: torch.Tensor,
    latency_ms: torch.Tensor,
    candidates: int,
    steps: int = 4,
    seed: int = 0,
    hidden: Sequence[int] = HIDDEN,
    heldout_fraction: float = HELDOUT_FRACTION,
    iterations: int = 3000,
    strata: torch.Tensor | None = None,
    derive_temperature: float | None = None,
    none_index: int | None = None,
) -> tuple[LatencyRegressor, float, torch.Tensor]:
    """Fit a regressor on all but a held-out ``heldout_fraction`` of the measurements.

    Minimises the mean squared relative error, full batch, Adam. ``strata``
    ((n,) integer labels, e.g. discrete / relaxed) holds out that fraction of
    each stratum; ``derive_temperature`` and ``none_index`` go to the
    ``LatencyRegressor``. Returns the regressor, its mean relative error
    ``|pred - y| / y`` on the held-out architectures, and their indices.
    """
    n = len(latency_ms)
    if n < 5:
        raise LatencyModelError(f"{n} measured architectures are too few to fit and check a latency model; use >= 5")
    g = torch.Generator().manual_seed(seed)
    strata = torch.zeros(n, dtype=torch.long) if strata is None else torch.as_tensor(strata).long()
    test, train = [], []
    for label in strata.unique().tolist():
        members = torch.nonzero(strata == label).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        held = max(1, int(round(len(members) * heldout_fraction)))
        test.append(members[:held])
        train.append(members[held:])
    test, train = torch.cat(test), torch.cat(train)
    x, y = encodings.float(), latency_ms.float()
    torch.manual_seed(seed)
    regressor = LatencyRegressor(
        steps, candidates, hidden, float(y[train].mean()), derive_temperature=derive_temperature, none_index=none_index
    )
    opt = torch.optim.Adam(regressor.parameters(), lr=3e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    with torch.enable_grad():
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            loss = ((regressor(x[train]) / y[train] - 1.0) ** 2).mean()
            loss.backward()
            opt.step()
            sched.step()
    regressor.eval()
    return regressor, relative_error(regressor, x[test], y[test]), test


def relative_error(regressor: LatencyRegressor, encodings: torch.Tensor, latency_ms: torch.Tensor) -> float:
    """Mean ``|predicted - measured| / measured`` over the rows given (NaN for none)."""
    if len(latency_ms) == 0:
        return float("nan")
    with torch.no_grad():
        y = latency_ms.float()
        return float(((regressor(encodings.float()) - y).abs() / y).mean())


__all__ = [
    "LatencyModel",
    "LatencyModelError",
    "LatencyRegressor",
    "encode_genotype",
    "derive_genotype",
    "encode_weights",
    "file_digest",
    "fit_regressor",
    "random_genotype",
    "random_relaxed_weights",
    "relative_error",
    "soft_derive",
]
