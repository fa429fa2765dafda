"""Single-path and one-shot supernets: paths, samplers, updates, selection, rank metrics, rank-eval."""

import copy
import io
import json
import math
import os
import random
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from fastnas.cli import main
from fastnas.nn.mixed_op import MixedOp
from fastnas.search import SearchConfig, Searcher, SearchError
from fastnas.search.methods import get_method
from fastnas.search.methods.single_path import drop_paths, fair_paths, full_path, zero_candidates
from fastnas.search.sampling import ArchitectureSampler, Constraint
from fastnas.spaces.darts import SearchNetwork
from fastnas.spaces.nb201 import NB201SearchNetwork
from fastnas.tools.rank_metrics import (
    bin_values,
    kendall_tau,
    rank_report,
    sparse_kendall_tau,
    sparse_kendall_tau_b,
    spearman_rho,
    top_k_overlap,
)
from fastnas.tools.selection import (
    SelectSettings,
    _Search,
    evolution_search,
    load_supernet,
    random_search,
    recalibrate_batch_norm,
)

INFO = {"num_classes": 4, "in_channels": 3, "image_size": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y), INFO


def nb201(**kw):
    torch.manual_seed(0)
    return NB201SearchNetwork(C=4, N=1, num_classes=4, in_channels=3, **kw)


# --- paths through the network -------------------------------------------------------------


def test_path_runs_only_its_candidates_and_matches_the_modules():
    """A subset through the fused edge equals the candidate modules summed, forward, backward and statistics."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=4, layers=3, in_channels=3).double()
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, MixedOp):
            m.backend = "reference"
    rng = random.Random(0)
    path = [tuple(sorted(rng.sample(range(8), rng.randint(0, 3)))) for _ in range(28)]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for n in (net, ref):
        n.set_path(path)
    out, out_ref = net(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    edges = [m for m in net.modules() if isinstance(m, MixedOp)]
    assert sum(m.fused_reason is None for m in edges) > len(edges) // 2
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10)
    for b, b_ref in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10)
    # Candidates off the path have no gradient at all.
    cell = net.cells[0]
    for e, entry in enumerate(path[:14]):
        for k, op in enumerate(cell.edges[e].ops):
            for p in op.parameters():
                assert (p.grad is not None) == (k in entry), (e, k)


def test_set_path_checks_its_entries():
    net = nb201()
    with pytest.raises(ValueError, match="one per choice block"):
        net.set_path([(0,)] * 5)
    with pytest.raises(ValueError, match="has 5"):
        net.set_path([(5,)] * 6)
    net.set_path([1] * 6)
    assert net.path == ((1,),) * 6


# --- samplers ------------------------------------------------------------------------------------


def test_uniform_sampling_covers_every_candidate_evenly():
    encoding = nb201().encoding()
    rng = random.Random(0)
    draws = 5000
    counts = [Counter() for _ in encoding.cardinalities]
    for _ in range(draws):
        for c, g in zip(counts, encoding.sample(rng)):
            c[g] += 1
    for c, k in zip(counts, encoding.cardinalities):
        assert len(c) == k
        for v in c.values():
            # 5 sigma of a binomial(5000, 1/5): 200 +- 28 per sigma.
            assert abs(v - draws / k) < 5 * math.sqrt(draws / k * (1 - 1 / k))


def test_darts_genes_are_genotypes_both_ways():
    net = SearchNetwork(C=4, num_classes=4, layers=3, in_channels=3)
    encoding = net.encoding()
    rng = random.Random(1)
    for _ in range(20):
        genes = encoding.sample(rng)
        assert encoding.from_json(encoding.to_json(genes)) == genes
        path = encoding.to_path(genes)
        # Two inputs per node, none of them 'none'.
        for node in net.choice_nodes():
            assert sum(len(path[b]) for b in node) == 2
        assert all(net.choice_candidates()[b][k] != "none" for b, entry in enumerate(path) for k in entry)


def test_fairnas_trains_every_candidate_exactly_once_per_step():
    net = nb201()
    rng = random.Random(0)
    for _ in range(10):
        paths = fair_paths(net.choice_sizes(), rng)
        assert len(paths) == 5
        for b, size in enumerate(net.choice_sizes()):
            assert sorted(k for p in paths for k in p[b]) == list(range(size))


def test_path_dropout_rates_and_no_empty_node():
    net = nb201()
    nodes, zero = net.choice_nodes(), zero_candidates(net)
    full = full_path(net)
    rng = random.Random(0)
    kept = Counter()
    trials = 2000
    for _ in range(trials):
        path = drop_paths(full, nodes, [0.3] * len(nodes), zero, rng)
        for node in nodes:
            assert sum(len(path[b]) for b in node) >= 1
        for b, entry in enumerate(path):
            for k in entry:
                kept[b, k] += 1
    # Node 3 has 12 candidates: losing them all (then keeping one) is rare; each stays with p = 0.7.
    for b in (3, 4, 5):
        for k in full[b]:
            assert abs(kept[b, k] / trials - 0.7) < 0.05


def test_path_dropout_schedule():
    cfg = SearchConfig.create("spos", dataset="digits", space="nb201", epochs=4, path_dropout=0.2)
    net = nb201()
    method = get_method("spos")
    stage = cfg.stages()[0]
    seen = [method.on_epoch(net, cfg, stage, e)["path_dropout"] for e in range(4)]
    assert seen == pytest.approx([0.0, 0.05, 0.1, 0.15])
    oneshot = get_method("oneshot")
    cfg = SearchConfig.create("oneshot", dataset="digits", space="nb201", epochs=4, path_dropout=0.5)
    oneshot.on_epoch(net, cfg, stage, 2)
    assert net.path_dropout_schedule == pytest.approx(0.5)
    assert net.path_dropout_prob == 0.0


def test_constrained_sampling_stays_in_range():
    encoding = nb201().encoding()

    def cost(genes, kind):
        return float(sum(genes))

    sampler = ArchitectureSampler(encoding, cost, Constraint("params", 6, 13), bins=7)
    rng = random.Random(0)
    values = [sum(sampler.sample(rng)) for _ in range(300)]
    assert min(values) >= 6 and max(values) <= 13
    assert len(set(values)) >= 6  # the bins spread the draws over the range


# --- updates --------------------------------------------------------------------------------------


def _searcher(method, **kw):
    data = tiny_data()
    cfg = SearchConfig.create(method, dataset="digits", space="nb201", init_channels=4, batch_size=16, **kw)
    searcher = Searcher(cfg, dataset=data, progress=False)
    searcher.info = data[1]
    torch.manual_seed(0)
    net = NB201SearchNetwork(C=4, N=1, num_classes=4, in_channels=3)
    if not cfg.bn_track:
        net.use_batch_statistics()
    stage = cfg.stages()[0]
    parts = cfg.search_method.make_optimizers(searcher, net, stage)
    return searcher, net, parts, stage


def test_sgd_leaves_parameters_without_gradient_alone():
    """What the single-path methods rely on, on the installed torch: SGD skips a parameter
    whose grad is None entirely, momentum buffer and weight decay included."""
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.1)
    (a.sum() + b.sum()).backward()
    opt.step()
    b_before, mom_before = b.detach().clone(), opt.state[b]["momentum_buffer"].clone()
    opt.zero_grad(set_to_none=True)
    a.sum().backward()
    opt.step()
    assert torch.equal(b, b_before)
    assert torch.equal(opt.state[b]["momentum_buffer"], mom_before)


def test_spos_step_leaves_unsampled_candidates_bit_identical():
    searcher, net, parts, stage = _searcher("spos")
    method = searcher.method
    method.on_epoch(net, searcher.config, stage, 0)
    step = method.make_step(searcher, net, net, parts, True, 0.1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    step(x, y)
    opt = parts["w_opt"]
    for _ in range(3):
        params = {n: p.detach().clone() for n, p in net.named_parameters()}
        state = {
            n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters() if p in opt.state
        }
        step(x, y)
        path = net.path
        for n, p in net.named_parameters():
            parts_ = n.split(".")
            if "edges" not in parts_:
                continue
            e, k = int(parts_[parts_.index("edges") + 1]), int(parts_[parts_.index("ops") + 1])
            if k in path[e]:
                continue
            assert torch.equal(p, params[n]), n
            if p in opt.state:
                assert all(torch.equal(v, state[n][key]) for key, v in opt.state[p].items()), n
            else:
                assert n not in state


def test_fairnas_step_updates_every_candidate_once():
    searcher, net, parts, stage = _searcher("fairnas")
    searcher.method.on_epoch(net, searcher.config, stage, 0)
    step = searcher.method.make_step(searcher, net, net, parts, True, 0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss, correct, _, _ = step(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))).tolist()
    assert math.isfinite(loss) and 0 <= correct <= 16
    for n, p in net.named_parameters():
        if ".ops." in n and p.dim() > 1:
            assert not torch.equal(p, before[n]), n


def test_oneshot_step_uses_ghost_batches():
    searcher, net, parts, stage = _searcher("oneshot", ghost_batch_size=4)
    searcher.method.on_epoch(net, searcher.config, stage, 1)
    step = searcher.method.make_step(searcher, net, net, parts, True, 0.1)
    seen = []
    net.stem.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    step(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))
    assert seen == [4, 4, 4, 4]


# --- batch-norm recalibration ----------------------------------------------------------------------


def test_recalibration_is_the_mean_over_its_batches():
    net = nb201()
    net.set_path([(3,), (1,), (2,), (0,), (4,), (3,)])
    with torch.no_grad():
        for bn in [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.running_mean.fill_(7.0)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    means = []
    hook = net.stem[0].register_forward_hook(lambda m, i, o: means.append(o.mean((0, 2, 3))))
    recalibrate_batch_norm(net, batches)
    hook.remove()
    bn = net.stem[1]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and net.training


# --- selection -------------------------------------------------------------------------------------


def test_evolution_finds_the_optimum_of_a_toy_objective():
    encoding = nb201().encoding()
    target = (4, 1, 3, 0, 2, 3)

    def score(genes):
        hits = sum(a == b for a, b in zip(genes, target))
        return {"val_acc": hits / 6, "val_loss": 6.0 - hits}

    settings = SelectSettings(strategy="evolution")
    ranked = evolution_search(_Search(encoding, score, None, None, random.Random(0)), settings)
    assert tuple(ranked[0]["genes"]) == target
    assert len(ranked) <= settings.population * (settings.generations + 1)
    rand = random_search(_Search(encoding, score, None, None, random.Random(0)), SelectSettings("random", 50))
    assert len(rand) == 50 and rand[0]["val_acc"] <= 1.0


# --- rank metrics --------------------------------------------------------------------------------


def test_rank_metrics_hand_computed():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # One pair tied in x: C = 5, D = 0 of 6 pairs; tau-b = 5 / sqrt(5 * 6).
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    # Ties on both sides: x = [1,1,2,3], y = [1,2,2,1]: pair (0,2) concordant, (1,3) and (2,3)
    # discordant, (0,1) tied in x, (0,3) and (1,2) tied in y: (1 - 2) / sqrt((6 - 1) (6 - 2)).
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 1]) == pytest.approx(-1 / math.sqrt(5 * 4))
    # Ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: rho = 4.5 / sqrt(4.5 * 5).
    assert spearman_rho([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    # 90.01% and 90.04% share the 0.1% bin: the same tie as above.
    assert bin_values([0.9001, 0.9004, 0.912, 0.95], 0.001) == [900, 900, 912, 950]
    assert bin_values([0.3], 0.001) == [300]
    assert sparse_kendall_tau_b([0.9001, 0.9004, 0.912, 0.95], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert sparse_kendall_tau([0.9001, 0.9004, 0.912, 0.95], [1, 2, 3, 4]) == 1.0
    assert kendall_tau([0.9001, 0.9004, 0.912, 0.95], [2, 1, 3, 4]) == pytest.approx(4 / 6)
    assert top_k_overlap([5, 4, 3, 2, 1], [5, 1, 4, 3, 2], 2) == 0.5
    report = rank_report([0.5, 0.9, 0.7, 0.8], [0.1, 0.4, 0.3, 0.2], k=2)
    assert report["supernet_top3_standalone"] == [0.9, 0.7, 0.8]
    assert report["supernet_top3_standalone_rank"] == [1, 3, 2]


def test_rank_metrics_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(100):
        n = rng.randint(3, 15)
        x = [rng.randint(0, 5) for _ in range(n)]
        y = [rng.randint(0, 3) for _ in range(n)]
        for ours, theirs in ((kendall_tau, stats.kendalltau), (spearman_rho, stats.spearmanr)):
            a, b = ours(x, y), float(theirs(x, y).statistic)
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


# --- the commands -------------------------------------------------------------------------------


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def spos_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("spos"))
    code, _, err = run_cli(
        "search", "--method", "spos", "--space", "nb201", "--epochs", "1", "--init-channels", "4", "--out", out,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    return out


def test_spos_search_writes_a_supernet_and_select_a_genotype(spos_run, tmp_path):
    assert not os.path.exists(os.path.join(spos_run, "genotype.json"))
    out = str(tmp_path / "sel")
    code, stdout, err = run_cli(
        "select", spos_run, "--strategy", "evolution", "--population", "6", "--generations", "2", "--parents", "3",
        "--mutations", "2", "--crossovers", "2", "--bn-batches", "2", "--out", out, "--no-progress",
        "--constraint", "params", "--constraint-max", "200000",
    )  # fmt: skip
    assert code == 0, err
    assert f"fastnas train {out}/genotype.json --dataset digits" in stdout
    with open(os.path.join(out, "select-evolution.json")) as f:
        sel = json.load(f)
    accs = [r["val_acc"] for r in sel["ranked"]]
    assert accs == sorted(accs, reverse=True)
    assert all(r["params"] <= 200000 for r in sel["ranked"])
    with open(os.path.join(out, "genotype.json")) as f:
        assert json.load(f) == sel["best"]["architecture"]
    assert os.path.exists(os.path.join(out, "cells.png"))


def test_select_errors(spos_run, tmp_path):
    code, _, err = run_cli("select", str(tmp_path / "missing"))
    assert code == 1 and err.startswith("fastnas select: error:") and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli("select", str(bad))
    assert code == 1 and "corrupt" in err
    code, _, err = run_cli("select", spos_run, "--constraint", "flops")
    assert code == 1 and "needs a maximum" in err
    darts_dir = str(tmp_path / "darts")
    code, _, err = run_cli(
        "search", "--method", "gdas", "--space", "nb201", "--epochs", "1", "--init-channels", "4", "--out", darts_dir,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("select", darts_dir)
    assert code == 1 and "no supernet to select from" in err and err.count("\n") == 1


def test_spos_resume_is_exact(tmp_path):
    data = tiny_data(64)
    kw = dict(dataset="digits", space="nb201", init_channels=4, batch_size=16, epochs=2, path_dropout=0.1)
    full = Searcher(SearchConfig.create("spos", **kw), out_dir=str(tmp_path / "a"), dataset=data, progress=False).run()
    cfg = SearchConfig.create("spos", **dict(kw, epochs=2))
    first = Searcher(cfg, out_dir=str(tmp_path / "b"), dataset=data, progress=False)
    orig = first._save

    def save_then_stop(net, parts, stage, stage_epoch, *rest):
        orig(net, parts, stage, stage_epoch, *rest)
        if stage_epoch == 1:
            raise KeyboardInterrupt

    first._save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = Searcher.resume(str(tmp_path / "b"), dataset=data, progress=False).run()
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_rank_eval_end_to_end(tmp_path):
    out = str(tmp_path / "re")
    args = (
        "rank-eval", "--architectures", "3", "--standalone-epochs", "1", "--standalone-channels", "4",
        "--standalone-layers", "1", "--epochs", "1", "--workers", "1", "--bn-batches", "2", "--out", out,
        "--no-progress", "--compare", "base", "nobn:bn_track=false,bn_affine=true",
    )  # fmt: skip
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert "| base | spos |" in stdout and "| nobn | spos |" in stdout
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert [r["setting"] for r in report["settings"]] == ["base", "nobn"]
    for name in ("base", "nobn"):
        with open(os.path.join(out, f"pairs-{name}.json")) as f:
            pairs = json.load(f)["pairs"]
        assert len(pairs) == 3 and all(0 <= p["standalone_accuracy"] <= 1 for p in pairs)
        assert os.path.getsize(os.path.join(out, f"scatter-{name}.png")) > 1000
    assert os.path.exists(os.path.join(out, "table.md"))
    # A second run reuses the stand-alone results and the finished supernets.
    mtime = os.path.getmtime(os.path.join(out, "supernet-base", "checkpoint.pt"))
    code, _, err = run_cli(*args[:-3])
    assert code == 0, err
    assert os.path.getmtime(os.path.join(out, "supernet-base", "checkpoint.pt")) == mtime


def test_rank_eval_bad_setting(tmp_path):
    code, _, err = run_cli("rank-eval", "--out", str(tmp_path), "--compare", "bogus_option=1")
    assert code == 1 and "unknown settings" in err
    code, _, err = run_cli("rank-eval", "--out", str(tmp_path), "--compare", "method=darts")
    assert code == 1 and "trains architecture weights" in err


def test_single_path_methods_refuse_what_they_cannot_do():
    with pytest.raises(SearchError, match="partial"):
        SearchConfig.create("spos", space="darts", partial_channels=4)
    with pytest.raises(SearchError, match="spos"):
        SearchConfig.create("fairnas", space="nb201", constraint="params", constraint_max=1e5)
    with pytest.raises(SearchError, match="path-dropout"):
        SearchConfig.create("darts", space="nb201", path_dropout=0.1)
    with pytest.raises(SearchError, match="constraint-max"):
        SearchConfig.create("spos", space="nb201", constraint="flops")


def test_supernet_loads_for_selection(spos_run):
    supernet = load_supernet(spos_run)
    scorer = supernet.scorer(bn_batches=2)
    genes = supernet.net.encoding().sample(random.Random(0))
    first, second = scorer(genes), scorer(genes)
    assert first == second  # recalibration on fixed batches: the same score every time
    assert 0.0 <= first["val_acc"] <= 1.0


def test_weight_step_loss_matches_plain_forward():
    searcher, net, parts, stage = _searcher("spos")
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    step = searcher.method.make_step(searcher, net, net, parts, True, 0.1)
    state = copy.deepcopy(net.state_dict())
    loss = step(x, y)[0].item()
    path = net.path
    check = nb201()
    check.load_state_dict(state)
    check.set_path(path)
    # SPOS' label smoothing (0.1) on the training loss.
    expected = F.cross_entropy(check(x), y, label_smoothing=searcher.config.label_smoothing)
    assert loss == pytest.approx(expected.item(), rel=1e-6)


def test_shufflenet_space_paths_and_stand_alone_network():
    from fastnas.spaces.shufflenet import SHUFFLENET_CHOICES, ShuffleNetNetwork, ShuffleNetSearchNetwork

    torch.manual_seed(0)
    net = ShuffleNetSearchNetwork(C=4, num_classes=4, in_channels=3, stem_stride=1)
    encoding = net.encoding()
    genes = encoding.sample(random.Random(0))
    assert encoding.from_json(encoding.to_json(genes)) == genes
    net.set_path(encoding.to_path(genes))
    x = torch.randn(2, 3, 8, 8)
    assert net(x).shape == (2, 4)
    net(x).sum().backward()
    for layer, g in zip(net.layers, genes):
        for k, block in enumerate(layer):
            assert all((p.grad is not None) == (k == g) for p in block.parameters())
    standalone = ShuffleNetNetwork(encoding.to_json(genes)["blocks"], C=4, num_classes=4, in_channels=3, stem_stride=1)
    conv = lambda m: [tuple(c.weight.shape) for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    path_convs = conv(net.first_conv) + [s for layer, g in zip(net.layers, genes) for s in conv(layer[g])]
    assert conv(standalone.first_conv) + conv(standalone.layers) == path_convs
    assert standalone(x)[0].shape == (2, 4)
    with pytest.raises(ValueError, match="20 blocks"):
        encoding.from_json({"blocks": SHUFFLENET_CHOICES})


def test_darts_space_spos_search_and_select(tmp_path):
    data = tiny_data(64)
    cfg = SearchConfig.create(
        "spos", dataset="digits", space="darts", init_channels=4, layers=3, batch_size=16, epochs=1
    )
    out = str(tmp_path / "run")
    Searcher(cfg, out_dir=out, dataset=data, progress=False).run()
    supernet = load_supernet(out, dataset=data)
    from fastnas.tools.selection import select

    result = select(out, SelectSettings("random", candidates=3, bn_batches=1), progress=False, supernet=supernet)
    assert len(result.ranked) == 3 and set(result.files) == {"select-random.json", "genotype.json", "cells.png"}
    from fastnas.spaces.darts import genotype_from_dict

    genotype_from_dict(result.best["architecture"])


def test_shufflenet_network_has_the_size_spos_reports():
    """SPOS' searched architecture: 3.5M parameters and 323M FLOPs (multiply-adds) on ImageNet."""
    from fastnas.spaces.shufflenet import SHUFFLENET_CHOICES, ShuffleNetNetwork
    from fastnas.train import report

    genes = (2, 1, 0, 1, 2, 0, 2, 0, 2, 0, 2, 3, 0, 0, 0, 0, 3, 2, 3, 3)
    net = ShuffleNetNetwork([SHUFFLENET_CHOICES[g] for g in genes], C=16, num_classes=1000, in_channels=3)
    assert report.count_parameters(net)[0] == 3_558_464
    assert report.count_flops(net, 3, 224, "cpu") // 2 == 322_918_720


@pytest.mark.slow
def test_rank_eval_trains_in_worker_processes(tmp_path):
    """The default path: stand-alone trainings in spawned worker processes."""
    from fastnas.tools.rank_eval import RankEvalSettings, rank_eval

    settings = RankEvalSettings(
        architectures=2, standalone_epochs=1, standalone={"init_channels": 4}, supernet={"epochs": 1}, workers=2,
        bn_batches=1,
    )  # fmt: skip
    report = rank_eval(settings, str(tmp_path), progress=False)
    assert report["architectures"] == 2 and len(report["settings"]) == 1
    with open(tmp_path / "standalone.json") as f:
        assert len(json.load(f)["results"]) == 2


def test_darts_path_with_batch_statistics_only_runs_fused_and_matches_reference(fused_edge_calls):
    """A sampled path of a DARTS supernet whose batch norms keep no running statistics (the
    heuristic ``--no-bn-track``) runs through the fused edge, with the reference's results."""
    torch.manual_seed(0)
    fused = SearchNetwork(C=4, num_classes=4, layers=2, in_channels=3).double()
    reference = copy.deepcopy(fused)
    for m in reference.modules():
        if isinstance(m, MixedOp):
            m.backend = "reference"
    for net in (fused, reference):
        net.use_batch_statistics()
        net.set_path([(1, 2, 4, 6)] * len(net.choice_sizes()))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    outs, grads = [], []
    for net in (fused, reference):
        out = net(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in net.parameters() if p.grad is not None])
    assert fused_edge_calls
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-10)
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
