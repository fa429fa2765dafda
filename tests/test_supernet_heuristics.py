"""Yu et al.'s supernet-training heuristics (fastnas.spaces.nb201.heuristics): each one changes the
nb201 supernet's training as the study's code defines it, and rank-eval's default list runs them."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastnas.search import SearchConfig, Searcher, SearchError
from fastnas.search.searcher import build_supernet
from fastnas.spaces.nb201 import NB201SearchCell, NB201SearchNetwork, nb201_edges
from fastnas.spaces.nb201.heuristics import ElasticKernel, ElasticReLUConvBN, node_op_sources
from fastnas.tools.rank_eval import RankEvalSettings, Setting, _search_config, heuristics
from fastnas.tools.selection import load_supernet

INFO = {"num_classes": 4, "in_channels": 3, "image_size": 8}
KNOBS = ("global_dropout", "layer_path_dropout", "ops_on_nodes", "ofa_kernel")


pytestmark = pytest.mark.usefixtures("one_thread")


def nb201(**kw):
    torch.manual_seed(0)
    return NB201SearchNetwork(C=4, N=1, num_classes=4, in_channels=3, **kw)


def config(method="spos", **kw):
    return SearchConfig.create(method, dataset="digits", space="nb201", init_channels=4, batch_size=16, **kw)


def supernet(cfg):
    torch.manual_seed(0)
    return build_supernet(cfg, 4, 3, cfg.stages()[0]["layers"])


def count(net):
    return sum(p.numel() for p in net.parameters())


PATH = [(3,), (2,), (3,), (1,), (3,), (3,)]


# --- the default comparison ---------------------------------------------------------------------


def test_default_compare_list_covers_the_heuristics_of_each_space():
    def keys(space, method="spos"):
        return {
            k
            for text in heuristics(RankEvalSettings(space=space, method=method))
            for k in Setting.parse(text).overrides
        }

    assert {*KNOBS, "label_smoothing", "batch_size", "layers", "method", "bn_track", "path_dropout"} <= keys("nb201")
    # Another space's supernet does not read the nb201 knobs, and ShuffleNet's depth is fixed.
    assert not set(KNOBS) & (keys("darts") | keys("shufflenet"))
    assert {"label_smoothing", "batch_size", "layers"} <= keys("darts")
    assert "layers" not in keys("shufflenet") and "label_smoothing" in keys("shufflenet")
    # Each setting changes the base run in what it names: SPOS smooths its labels already, so the
    # comparison turns smoothing off there and on for FairNAS, and FairNAS is no setting of its own.
    for method, smoothing in (("spos", "label_smoothing=0"), ("fairnas", "label_smoothing=0.1")):
        settings = RankEvalSettings(space="nb201", method=method)
        texts = heuristics(settings)
        assert smoothing in texts and ("method=fairnas" in texts) == (method == "spos")
        base = _search_config(settings, Setting.parse("base"))
        for text in texts[1:]:
            setting = Setting.parse(text)
            cfg = _search_config(settings, setting)
            changed = setting.overrides.keys() - {"method"}
            assert all(getattr(cfg, k) != getattr(base, k) for k in changed), text
            assert cfg.to_dict() != base.to_dict(), text


# --- label smoothing ------------------------------------------------------------------------------


def test_label_smoothing_changes_the_training_loss_on_a_fixed_batch():
    x, y = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 4
    losses = {}
    for smoothing in (0.0, 0.1):
        cfg = config(label_smoothing=smoothing)
        searcher = Searcher(cfg, dataset=(None, INFO), progress=False)
        searcher.info = INFO
        net = supernet(cfg)
        state = copy.deepcopy(net.state_dict())
        stage = cfg.stages()[0]
        parts = cfg.search_method.make_optimizers(searcher, net, stage)
        torch.manual_seed(0)
        step = cfg.search_method.make_step(searcher, net, net, parts, True, 0.1)
        losses[smoothing] = step(x, y)[0].item()
        check = supernet(cfg)
        check.load_state_dict(state)
        check.set_path(net.path)
        logits = check(x)
        assert losses[smoothing] == pytest.approx(
            F.cross_entropy(logits, y, label_smoothing=smoothing).item(), rel=1e-6
        )
    assert losses[0.1] != pytest.approx(losses[0.0], rel=1e-3)
    with pytest.raises(SearchError, match="label-smoothing"):
        config(label_smoothing=1.0)


# --- path dropout scaled by layer index --------------------------------------------------------------


def _cell_outputs(net, x):
    """Each search cell's output before and after the drop (the next module's input)."""
    cells = [i for i, c in enumerate(net.cells) if isinstance(c, NB201SearchCell)]
    nexts = list(net.cells)[1:] + [net.lastact]
    seen = {}
    hooks = [net.cells[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("pre", i), o)) for i in cells]
    hooks += [nexts[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("post", i), a[0])) for i in cells]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return {i: (seen["pre", i], seen["post", i]) for i in cells}


def test_layer_path_dropout_drops_cell_outputs_with_the_layer_scaled_probability():
    cfg = config(layer_path_dropout=0.5)
    net = supernet(cfg)
    assert len(net.cells) == 5  # 3 stages of one cell, two residual reductions: L = 3N + 2
    assert [net.layer_drop_probability(i) for i in (0, 2, 4)] == pytest.approx([0.1, 0.3, 0.5])
    net.set_path(PATH)
    torch.manual_seed(3)
    x = torch.randn(3000, 3, 8, 8)
    for i, (pre, post) in _cell_outputs(net, x).items():
        p = net.layer_drop_probability(i)
        dropped = (post.flatten(1) == 0).all(1)
        assert dropped.float().mean().item() == pytest.approx(p, abs=0.04), i
        torch.testing.assert_close(post[~dropped], pre[~dropped] / (1 - p))
    net.eval()
    for pre, post in _cell_outputs(net, x[:64]).values():
        assert torch.equal(pre, post)


def test_global_dropout_drops_the_pooled_features_in_training_only():
    net = supernet(config(global_dropout=0.2))
    net.set_path(PATH)
    seen = {}
    net.global_pooling.register_forward_hook(lambda m, a, o: seen.__setitem__("pooled", o.flatten(1)))
    net.classifier.register_forward_pre_hook(lambda m, a: seen.__setitem__("features", a[0]))
    torch.manual_seed(0)
    x = torch.randn(2000, 3, 8, 8)
    with torch.no_grad():
        net(x)
    pooled, features = seen["pooled"], seen["features"]
    live = pooled != 0
    dropped = live & (features == 0)
    assert dropped.sum().item() / live.sum().item() == pytest.approx(0.2, abs=0.02)
    torch.testing.assert_close(features[live & ~dropped], pooled[live & ~dropped] / 0.8)
    net.eval()
    with torch.no_grad():
        net(x[:8])
    assert torch.equal(seen["features"], seen["pooled"])


# --- operations on nodes ----------------------------------------------------------------------------


def test_ops_on_nodes_share_a_nodes_candidates_as_the_study_does():
    # SearchCellOnNode: node i's edges from nodes 0 and 1 have their own candidates, the others run node 1's.
    assert node_op_sources(nb201_edges()) == [0, 1, 2, 3, 4, 4]
    assert node_op_sources(nb201_edges(5))[-4:] == [6, 7, 7, 7]
    base, shared = supernet(config()), supernet(config(ops_on_nodes=True))
    for cell in (c for c in shared.cells if isinstance(c, NB201SearchCell)):
        edges = list(cell.edges)
        assert edges[5] is edges[4] and len({id(e) for e in edges}) == 5
    # One edge's candidates fewer per cell (the stages differ in channels).
    fewer = sum(count(c.edges[5]) for c in base.cells if isinstance(c, NB201SearchCell))
    assert count(shared) == count(base) - fewer and fewer > 0
    assert shared.choice_sizes() == base.choice_sizes() == [5] * 6
    # The same network as a per-edge supernet whose edge 2 -> 3 holds a copy of edge 1 -> 3.
    state = shared.state_dict()
    base.load_state_dict(state)
    x = torch.randn(8, 3, 8, 8)
    for path in (PATH, [(2,), (3,), (1,), (4,), (3,), (2,)]):
        for net in (base, shared):
            net.set_path(path)
        torch.testing.assert_close(base(x), shared(x), rtol=0, atol=0)


# --- OFA kernel transformation ----------------------------------------------------------------------


def test_ofa_kernel_derives_the_1x1_kernel_from_the_3x3_one():
    base, ofa = supernet(config()), supernet(config(ofa_kernel=True))
    edge, plain = ofa.cells[0].edges[0], base.cells[0].edges[0]
    small, large = edge.ops[2], edge.ops[3]  # nor_conv_1x1, nor_conv_3x3
    assert isinstance(small, ElasticReLUConvBN) and isinstance(large, ElasticReLUConvBN)
    assert small.kernel is large.kernel and small.bn is large.bn and isinstance(small.kernel, ElasticKernel)
    # The 3x3 weight starts as without the option; the 1x1 weight is gone, a 1x1 transformation added.
    assert torch.equal(large.kernel.weight, plain.ops[3].op[1].weight)
    # Per edge: the 1x1 weight gone (C x C), a 1x1 transformation added (1).
    cells = [c for c in base.cells if isinstance(c, NB201SearchCell)]
    assert count(ofa) == count(base) - sum(6 * (c.edges[0].ops[2].op[1].weight.numel() - 1) for c in cells)
    with torch.no_grad():
        small.kernel.transform_3to1.fill_(1.5)
    w = large.kernel.weight
    torch.testing.assert_close(small.kernel.kernel(1), 1.5 * w[:, :, 1:2, 1:2])
    assert small.kernel.kernel(3) is w
    x = torch.randn(4, 4, 6, 6)
    small.train()
    torch.testing.assert_close(
        small(x), F.batch_norm(F.conv2d(F.relu(x), 1.5 * w[:, :, 1:2, 1:2]), None, None, training=True)
    )
    # Training the 1x1 candidate moves the centre of the 3x3 kernel and the transformation, nothing else.
    small(x).square().sum().backward()
    grad = w.grad
    assert grad[:, :, 1, 1].abs().sum() > 0 and grad[:, :, 0].abs().sum() == 0 and grad[:, :, :, 2].abs().sum() == 0
    assert small.kernel.transform_3to1.grad.abs().item() > 0


def test_ofa_kernel_over_larger_kernels():
    weight = torch.nn.Parameter(torch.randn(3, 2, 5, 5))
    kernel = ElasticKernel(weight, (1, 3, 5))
    with torch.no_grad():
        kernel.transform_5to3.copy_(torch.randn(9, 9))
        kernel.transform_3to1.fill_(0.5)
    three = (weight[:, :, 1:4, 1:4].reshape(6, 9) @ kernel.transform_5to3.T).reshape(3, 2, 3, 3)
    torch.testing.assert_close(kernel.kernel(3), three)
    torch.testing.assert_close(kernel.kernel(1), 0.5 * three[:, :, 1:2, 1:2])
    with pytest.raises(ValueError, match="no 7x7"):
        kernel.kernel(7)


# --- where the knobs apply --------------------------------------------------------------------------


def test_heuristics_are_refused_where_they_do_not_apply():
    with pytest.raises(SearchError, match="nb201|NAS-Bench-201"):
        SearchConfig.create("spos", space="darts", ops_on_nodes=True)
    with pytest.raises(SearchError, match="single-path"):
        config("darts", global_dropout=0.1)
    with pytest.raises(SearchError, match="global-dropout"):
        config(global_dropout=1.0)
    with pytest.raises(SearchError, match="ofa-kernel"):
        config(ofa_kernel=True, primitives=("none", "skip_connect", "nor_conv_3x3", "avg_pool_3x3"))
    with pytest.raises(SearchError, match="layers"):
        SearchConfig.create("spos", space="shufflenet", layers=2)


def test_a_search_with_every_knob_trains_saves_and_reloads(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 4, (48,), generator=g)
    )
    knobs = dict(global_dropout=0.2, layer_path_dropout=0.2, ops_on_nodes=True, ofa_kernel=True, label_smoothing=0.1)
    cfg = config(epochs=1, **knobs)
    out = str(tmp_path / "run")
    result = Searcher(cfg, out_dir=out, dataset=(data, INFO), progress=False).run()
    assert len(result.history) == 1
    trained = load_supernet(out, dataset=(data, INFO))
    assert all(getattr(trained.config, k) == v for k, v in knobs.items())
    cell = trained.net.cells[0]
    assert cell.edges[5] is cell.edges[4] and isinstance(cell.edges[0].ops[2], ElasticReLUConvBN)
    assert trained.net.global_dropout == 0.2 and trained.net.layer_path_dropout == 0.2


def test_resume_with_the_random_knobs_is_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    )
    kw = dict(epochs=2, global_dropout=0.2, layer_path_dropout=0.3, ops_on_nodes=True, ofa_kernel=True)
    full = Searcher(config(**kw), out_dir=str(tmp_path / "a"), dataset=(data, INFO), progress=False).run()
    first = Searcher(config(**kw), out_dir=str(tmp_path / "b"), dataset=(data, INFO), progress=False)
    save = first._save

    def save_then_stop(net, parts, stage, stage_epoch, *rest):
        save(net, parts, stage, stage_epoch, *rest)
        if stage_epoch == 1:
            raise KeyboardInterrupt

    first._save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = Searcher.resume(str(tmp_path / "b"), dataset=(data, INFO), progress=False).run()
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
