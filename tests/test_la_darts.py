"""LA-DARTS: the latency predictor (encoding, fit, file) and the latency-aware search."""

import math
import os
import random

import pytest
import torch
from search_helpers import assert_state_close, interrupt_at, losses, run, strip_times, tiny_config, tiny_dataset

from fastnas.cli import main
from fastnas.search import Searcher, SearchError
from fastnas.search.latency import (
    DERIVE_TEMPERATURE,
    LatencyModel,
    LatencyModelError,
    LatencyRegressor,
    derive_genotype,
    encode_genotype,
    encode_weights,
    random_genotype,
    random_relaxed_weights,
    relative_error,
    soft_derive,
)
from fastnas.spaces import DARTS_PRIMITIVES, SearchNetwork, validate_genotype
from fastnas.tools.latency_fit import RELAXED_SCALES, describe, fit_latency_model

# Milliseconds per edge of each candidate in the synthetic model below.
COST = {"none": 0.0, "max_pool_3x3": 0.5, "avg_pool_3x3": 0.5, "skip_connect": 0.2, "sep_conv_3x3": 3.0,
        "sep_conv_5x5": 4.0, "dil_conv_3x3": 2.0, "dil_conv_5x5": 2.5}  # fmt: skip
BASE_MS = 1.0


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_model(derive_temperature=None) -> LatencyModel:
    """A linear regressor whose latency is BASE_MS plus the COST of every operation (of the
    derived architecture, with ``derive_temperature``)."""
    regressor = LatencyRegressor(4, 8, hidden=(), derive_temperature=derive_temperature, none_index=0)
    with torch.no_grad():
        regressor.mlp[0].weight.copy_(torch.tensor([COST[c] for c in DARTS_PRIMITIVES]).repeat(4)[None])
        regressor.mlp[0].bias.fill_(BASE_MS)
    return LatencyModel(
        regressor=regressor, space="darts", candidates=list(DARTS_PRIMITIVES), steps=4, dataset="digits",
        device="cpu", network={"init_channels": 16, "layers": 8, "image_size": 8}, batch_size=1, threads=1,
        clock="wall", heldout_relative_error=0.0, samples=0,
    )  # fmt: skip


@pytest.fixture
def model_file(tmp_path):
    path = str(tmp_path / "latency.pt")
    synthetic_model().save(path)
    return path


def expected_ms(genotype) -> float:
    return BASE_MS + sum(COST[op] for cell in (genotype.normal, genotype.reduce) for op, _ in cell)


# --- the predictor -------------------------------------------------------------------------


def test_encodings_of_genotypes_and_of_relaxed_weights_agree():
    rng = random.Random(0)
    model = synthetic_model()
    for _ in range(5):
        genotype = random_genotype(rng, DARTS_PRIMITIVES)
        validate_genotype(genotype)
        enc = encode_genotype(genotype, DARTS_PRIMITIVES, 4).view(2, 14, 8)
        assert torch.equal(enc.sum(-1), torch.ones(2, 14))  # one operation per edge, none where left out
        assert int((enc[..., 0] == 0).sum()) == 16  # two kept edges per node, four nodes, two cells
        assert model.predict_genotype(genotype) == pytest.approx(expected_ms(genotype), rel=1e-6)
        # A relaxed architecture that puts all its weight on the genotype has the same encoding.
        alphas = {cell: 30.0 * enc[i] for i, cell in enumerate(("normal", "reduce"))}
        relaxed = encode_weights({cell: torch.softmax(a, -1) for cell, a in alphas.items()})
        torch.testing.assert_close(relaxed, enc.flatten(), atol=1e-9, rtol=0)


def test_fit_measures_fits_saves_and_loads(tmp_path):
    model = fit_latency_model(
        samples=8, network=dict(init_channels=4, layers=2), warmup=0, repeats=1, rounds=1, iterations=50
    )
    # As many relaxed architectures as discrete ones: softmax weights on every edge.
    assert model.data["encodings"].shape == (16, 2 * 14 * 8) and model.data["latency_ms"].shape == (16,)
    relaxed = model.data["relaxed"]
    assert relaxed.tolist() == [False] * 8 + [True] * 8 and model.relaxed_samples == 8
    rows = model.data["encodings"].view(16, 2, 14, 8)
    assert (rows[relaxed] > 0).all() and torch.equal(rows[~relaxed][..., 0].sum((-1, -2)), torch.full((8,), 12.0))
    assert (model.data["latency_ms"] > 0).all() and model.heldout_relative_error >= 0
    # The held-out error of each kind, on held-out architectures of that kind.
    assert set(model.heldout_errors) == {"discrete", "relaxed"}
    assert all(math.isfinite(e) and e >= 0 for e in model.heldout_errors.values())
    assert model.regressor.derive_temperature == DERIVE_TEMPERATURE
    assert model.network == {"init_channels": 4, "layers": 2, "image_size": 8} and model.threads == 1
    path = str(tmp_path / "m.pt")
    model.save(path)
    state = torch.load(path, weights_only=True)  # plain data, nothing to execute
    assert state["format"] == "fastnas-latency-model"
    assert state["heldout_errors"] == model.heldout_errors and state["relaxed_samples"] == 8
    loaded = LatencyModel.load(path)
    enc = model.data["encodings"]
    torch.testing.assert_close(loaded.predict(enc), model.predict(enc))
    assert loaded.heldout_relative_error == model.heldout_relative_error
    assert loaded.heldout_errors == model.heldout_errors and loaded.regressor.derive_temperature == DERIVE_TEMPERATURE
    assert "discrete" in describe(loaded) and "relaxed" in describe(loaded)


def test_relaxed_architectures_derive_as_the_search_does():
    g = torch.Generator().manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=2)
    for scale in RELAXED_SCALES:
        weights = random_relaxed_weights(g, 8, 4, scale)
        with torch.no_grad():
            for cell in ("normal", "reduce"):
                getattr(net, f"alphas_{cell}").copy_(weights[cell].log())
        assert derive_genotype(weights, DARTS_PRIMITIVES) == net.genotype()
        derived = encode_genotype(net.genotype(), DARTS_PRIMITIVES, 4)
        # The regressor's soft derivation leaves a discrete encoding as it is...
        torch.testing.assert_close(soft_derive(derived, 4, 8, 0, DERIVE_TEMPERATURE), derived, atol=1e-6, rtol=0)
    # ... and gives the derived genotype's encoding once the weights are decided.
    rng = random.Random(0)
    for _ in range(5):
        genotype = random_genotype(rng, DARTS_PRIMITIVES)
        enc = encode_genotype(genotype, DARTS_PRIMITIVES, 4).view(2, 14, 8)
        weights = 0.9 * enc + 0.1 * torch.softmax(torch.randn(2, 14, 8, generator=g), -1)
        derived = derive_genotype(dict(normal=weights[0], reduce=weights[1]), DARTS_PRIMITIVES)
        assert torch.equal(encode_genotype(derived, DARTS_PRIMITIVES, 4), enc.flatten())
        soft = soft_derive(weights.flatten(), 4, 8, 0, DERIVE_TEMPERATURE)
        torch.testing.assert_close(soft, enc.flatten(), atol=0.02, rtol=0)


def test_relaxed_training_predicts_the_derived_latency():
    """On a synthetic latency (the COST of the derived genotype) the fit on both kinds
    predicts held-out relaxed architectures well, with a gradient for the search."""
    from fastnas.search.latency import fit_regressor

    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    x, y = [], []
    for i in range(300):
        if i < 150:
            genotype = random_genotype(rng, DARTS_PRIMITIVES)
            x.append(encode_genotype(genotype, DARTS_PRIMITIVES, 4))
        else:
            weights = random_relaxed_weights(g, 8, 4, RELAXED_SCALES[i % len(RELAXED_SCALES)])
            genotype = derive_genotype(weights, DARTS_PRIMITIVES)
            x.append(encode_weights(weights))
        y.append(expected_ms(genotype))
    relaxed = torch.arange(300) >= 150
    kw = dict(iterations=400, strata=relaxed)
    regressor, _, held = fit_regressor(torch.stack(x), torch.tensor(y), 8, **kw, derive_temperature=0.01, none_index=0)
    held_relaxed = held[relaxed[held]]
    assert len(held_relaxed) == 30
    assert relative_error(regressor, torch.stack(x)[held_relaxed], torch.tensor(y)[held_relaxed]) < 0.1
    alphas = torch.randn(2, 14, 8).mul(0.03).requires_grad_()
    regressor(torch.softmax(alphas, -1).flatten()).backward()
    assert torch.isfinite(alphas.grad).all() and alphas.grad.abs().sum() > 0


def test_the_fit_learns_a_smooth_latency():
    from fastnas.search.latency import fit_regressor

    rng = random.Random(1)
    genotypes = [random_genotype(rng, DARTS_PRIMITIVES) for _ in range(200)]
    x = torch.stack([encode_genotype(g, DARTS_PRIMITIVES, 4) for g in genotypes])
    y = torch.tensor([expected_ms(g) for g in genotypes])
    _, error, held = fit_regressor(x, y, 8, iterations=1500)
    assert len(held) == 40 and error < 0.03


def test_latency_model_files_fail_clearly(tmp_path, model_file, capsys):
    with pytest.raises(LatencyModelError, match="no latency model"):
        LatencyModel.load(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(LatencyModelError, match="corrupt"):
        LatencyModel.load(str(bad))
    torch.save({"weights": torch.ones(2)}, bad)
    with pytest.raises(LatencyModelError, match="not a fastnas latency model"):
        LatencyModel.load(str(bad))
    state = torch.load(model_file, weights_only=True)
    torch.save(dict(state, version=99), bad)
    with pytest.raises(LatencyModelError, match="version 99"):
        LatencyModel.load(str(bad))
    torch.save(dict(state, regressor={"mlp.0.weight": torch.ones(1, 3)}), bad)
    with pytest.raises(LatencyModelError, match="damaged"):
        LatencyModel.load(str(bad))
    with pytest.raises(LatencyModelError, match="candidates"):
        LatencyModel.load(model_file).check_fits("darts", DARTS_PRIMITIVES[:5])
    # From the command line: one line, exit code 1.
    for args, message in (
        (["--latency-model", str(bad)], "damaged"),
        ([], "needs --latency-model"),
        (["--latency-model", model_file, "--latency-weight", "-1"], "--latency-weight"),
    ):
        capsys.readouterr()
        assert main(["search", "--method", "la-darts", "--no-progress", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SearchError, match="partial-channels"):
        tiny_config("la-darts", latency_model=model_file, partial_channels=2)


# --- the search ------------------------------------------------------------------------------


@pytest.mark.parametrize("derive_temperature", [None, DERIVE_TEMPERATURE])
def test_latency_term_steers_the_architecture(tmp_path, derive_temperature):
    model_file = str(tmp_path / "latency.pt")
    synthetic_model(derive_temperature).save(model_file)
    kw = dict(latency_model=model_file, epochs=2, arch_lr=0.05)
    free, free_net = run(tiny_config("la-darts", latency_weight=0.0, **kw))
    steered, steered_net = run(tiny_config("la-darts", latency_weight=1.0, **kw))
    for result in (free, steered):
        record = result.history[-1]
        assert record["predicted_latency_ms"] == pytest.approx(expected_ms(result.genotype), rel=1e-5)
        validate_genotype(result.genotype)
    assert steered.history[-1]["relaxed_predicted_latency_ms"] < free.history[-1]["relaxed_predicted_latency_ms"] - 1
    assert steered.history[-1]["predicted_latency_ms"] < free.history[-1]["predicted_latency_ms"]


def test_la_darts_fused_matches_reference(model_file):
    kw = dict(latency_model=model_file, latency_weight=0.1)
    ref, ref_net = run(tiny_config("la-darts", backend="reference", **kw))
    got, got_net = run(tiny_config("la-darts", **kw))
    for (a_train, a_val), (r_train, r_val) in zip(losses(got.history), losses(ref.history)):
        assert a_train == pytest.approx(r_train, rel=1e-5, abs=1e-6)
        assert a_val == pytest.approx(r_val, rel=1e-5, abs=1e-6)
    for a, r in zip(got_net.arch_parameters(), ref_net.arch_parameters()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert_state_close(got_net.state_dict(), ref_net.state_dict())


def test_la_darts_resumes_exactly_and_refuses_a_changed_model(tmp_path, monkeypatch, model_file):
    config = dict(latency_model=model_file, latency_weight=0.1, epochs=2)
    full, _ = run(tiny_config("la-darts", **config), str(tmp_path / "full"))
    out = str(tmp_path / "cut")
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_config("la-darts", **config), out)
    resumed = Searcher.resume(out, dataset=tiny_dataset(), progress=False).run()
    assert strip_times(resumed.history) == strip_times(full.history)

    with pytest.raises(SearchError, match="latency_weight"):
        Searcher.resume(out, {"latency_weight": 0.5})
    model = LatencyModel.load(model_file)
    with torch.no_grad():
        model.regressor.mlp[0].bias.fill_(2.0)
    model.save(model_file)
    with pytest.raises(LatencyModelError, match="changed since the search began"):
        Searcher.resume(out)
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_latency_model_command(tmp_path, capsys):
    out = str(tmp_path / "lat.pt")
    args = ["latency-model", "--samples", "5", "--init-channels", "4", "--layers", "2", "--warmup", "0",
            "--repeats", "1", "--rounds", "1", "--no-progress", "--out", out]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "5 architectures and 5 relaxed ones, held-out mean relative error" in printed and out in printed
    assert "(discrete " in printed and ", relaxed " in printed
    model = LatencyModel.load(out)
    assert model.samples == 5 and model.network["init_channels"] == 4 and model.threads == 1
    assert model.relaxed_samples == 5 and set(model.heldout_errors) == {"discrete", "relaxed"}
    assert main([*args[:-2], "--clock", "cpu", "--threads", "2", "--out", out]) == 1
    assert "--clock cpu" in capsys.readouterr().err
