"""The methods against their papers' original code: each test pins one detail that
``fastnas`` takes from the authors' code or paper, named in the test."""

import pytest
import torch
import torch.nn.functional as F
from search_helpers import tiny_dataset

from fastnas.nn import MixedOp
from fastnas.search import SearchConfig, Searcher, SearchError
from fastnas.spaces.nb201 import NB201SearchCell, NB201SearchNetwork, ResNetBasicBlock

pytestmark = pytest.mark.usefixtures("one_thread")


# --- GDAS (D-X-Y/AutoDL-Projects) -----------------------------------------------------------------


def _autodl_hardwts(alphas, tau):
    """``TinyNetworkGDAS.forward``'s sample (search_model_gdas.py), written out."""
    gumbels = -torch.empty_like(alphas).exponential_().log()
    probs = F.softmax((alphas.log_softmax(dim=1) + gumbels) / tau, dim=1)
    index = probs.max(-1, keepdim=True)[1]
    one_h = torch.zeros_like(probs).scatter_(-1, index, 1.0)
    return one_h - probs.detach() + probs, index


def _autodl_forward(net, x, hardwts, index, form):
    """The NAS-Bench-201 GDAS network's forward, by hand, on ``net``'s modules: each edge
    ``sum_j hardwts[j] * op_j(x) if j == argmax else hardwts[j]`` (``forward_gdas``, form
    "sum"), or ``hardwts[a] * op_a(x)`` (``forward_gdas_v1``, form "one")."""
    out = net.stem(x)
    for cell in net.cells:
        if isinstance(cell, ResNetBasicBlock):
            out = cell(out)
            continue
        assert isinstance(cell, NB201SearchCell)
        nodes, e = [out], 0
        for i in range(1, cell.max_nodes):
            inter = []
            for j in range(i):
                w, a = hardwts[e], index[e].item()
                ops = cell.edges[e].ops
                if form == "sum":
                    inter.append(sum(w[k] * op(nodes[j]) if k == a else w[k] for k, op in enumerate(ops)))
                else:
                    inter.append(w[a] * ops[a](nodes[j]))
                e += 1
            nodes.append(sum(inter))
        out = nodes[-1]
    out = net.global_pooling(net.lastact(out))
    return net.classifier(out.flatten(1))


@pytest.mark.parametrize("form", ["sum", "one"])
def test_gdas_architecture_gradient_is_autodl_forms(form):
    """fastnas' GDAS gives the alphas AutoDL's gradient, to float64 rounding."""
    torch.manual_seed(0)
    net = NB201SearchNetwork(C=4, N=1, num_classes=3, backend="reference").double()
    with torch.no_grad():
        net.alphas.normal_()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    tau = 2.0
    grads = []
    for seed in range(3):
        net.set_sampling("gumbel", tau, hard_form=form)
        torch.manual_seed(100 + seed)
        net.alphas.grad = None
        F.cross_entropy(net(x), y).backward()
        ours = net.alphas.grad.clone()
        torch.manual_seed(100 + seed)
        hardwts, index = _autodl_hardwts(net.alphas, tau)
        (theirs,) = torch.autograd.grad(F.cross_entropy(_autodl_forward(net, x, hardwts, index, form), y), net.alphas)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        grads.append(ours)
    if form == "sum":
        # Every alpha of an edge learns from each step, not only the sampled one's softmax row.
        assert all((g != 0).all() for g in grads)


def test_gdas_forms_differ_in_gradient_not_in_value():
    torch.manual_seed(1)
    net = NB201SearchNetwork(C=4, N=1, num_classes=3, backend="reference").double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    out, grad = {}, {}
    for form in ("sum", "one"):
        net.set_sampling("gumbel", 1.0, hard_form=form)
        torch.manual_seed(5)
        net.alphas.grad = None
        logits = net(x)
        logits.square().sum().backward()
        out[form], grad[form] = logits.detach(), net.alphas.grad.clone()
    torch.testing.assert_close(out["sum"], out["one"], rtol=0, atol=0)
    assert not torch.allclose(grad["sum"], grad["one"])


def test_gdas_form_defaults_follow_the_authors_code_per_space():
    assert SearchConfig.create("gdas", space="nb201").gdas_form == "sum"
    assert SearchConfig.create("gdas", space="darts").gdas_form == "one"
    assert SearchConfig.create("gdas", space="nb201", gdas_form="one").gdas_form == "one"
    with pytest.raises(SearchError, match="--gdas-form"):
        SearchConfig.create("gdas", space="nb201", gdas_form="all")
    with pytest.raises(SearchError, match="--gdas-form is for gdas"):
        SearchConfig.create("darts", gdas_form="sum")
    with pytest.raises(SearchError, match="--gdas-form one"):
        SearchConfig.create("gdas", space="darts", partial_channels=2, gdas_form="sum")


def _record_step_order(searcher, monkeypatch):
    """Wrap the searcher's weight and architecture steps to log their order."""
    order = []
    weight_step, arch_step = searcher._weight_step, searcher._arch_step

    def logged_weight(*args, **kwargs):
        order.append("weights")
        return weight_step(*args, **kwargs)

    def logged_arch(*args, **kwargs):
        order.append("arch")
        return arch_step(*args, **kwargs)

    monkeypatch.setattr(searcher, "_weight_step", logged_weight)
    monkeypatch.setattr(searcher, "_arch_step", logged_arch)
    return order


@pytest.mark.parametrize("method,first", [("gdas", "weights"), ("darts", "arch")])
def test_gdas_steps_the_weights_before_the_architecture(method, first, monkeypatch):
    """AutoDL's GDAS search_func (exps/NAS-Bench-201-algos/GDAS.py) updates the weights,
    then the architecture; DARTS the architecture first."""
    space = dict(space="nb201", layers=1) if method == "gdas" else dict(layers=3)
    cfg = SearchConfig.create(method, epochs=1, batch_size=8, init_channels=4, warmup_epochs=0, **space)
    searcher = Searcher(cfg, dataset=tiny_dataset(), progress=False)
    order = _record_step_order(searcher, monkeypatch)
    searcher.run()
    second = "arch" if first == "weights" else "weights"
    assert order == [first, second] * 2


def test_gdas_run_logs_its_form_and_temperature():
    cfg = SearchConfig.create("gdas", space="nb201", epochs=2, batch_size=8, init_channels=4, layers=1)
    searcher = Searcher(cfg, dataset=tiny_dataset(), progress=False)
    result = searcher.run()
    assert [r["gdas_form"] for r in result.history] == ["sum", "sum"]
    assert [r["tau"] for r in result.history] == pytest.approx([10.0, 0.1])
    assert all(m.hard_form == "sum" for m in searcher.net.modules() if isinstance(m, MixedOp))


# --- P-DARTS (chenxin061/pdarts) and PC-DARTS (yuhuixu1993/PC-DARTS): the architecture's clip -------


def _arch_step_norms(monkeypatch):
    """The norm of the architecture's gradient at each of Adam's steps."""
    norms = []
    step = torch.optim.Adam.step

    def recorded(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recorded)
    return norms


def _tiny(method, **overrides):
    kw = dict(epochs=1, batch_size=8, init_channels=4, layers=3, warmup_epochs=0)
    if method == "p-darts":
        kw.update(epochs=3, stage_layers=(3, 3, 3))
    kw.update(overrides)
    return SearchConfig.create(method, dataset="digits", **kw)


def test_pdarts_defaults_are_the_released_codes():
    """train_search.py: clip_grad_norm_ of the alphas at --grad_clip 5; the README's
    --dropout_rate 0.1 0.4 0.7 and --add_layers 6 12; on CIFAR-100 the same command."""
    for dataset in ("digits", "cifar10", "cifar100"):
        cfg = SearchConfig.create("p-darts", dataset=dataset)
        assert cfg.arch_grad_clip == 5.0
        assert cfg.skip_drop == (0.1, 0.4, 0.7)
        assert cfg.stage_layers == (5, 11, 17) and cfg.stage_keep == (5, 3)
    cfg = SearchConfig.create("p-darts", dataset="cifar10")
    assert [s["skip_drop"] for s in cfg.stages()] == [0.1, 0.4, 0.7]
    assert SearchConfig.create("p-darts", dataset="cifar100", skip_drop=(0.1, 0.2, 0.3)).skip_drop == (0.1, 0.2, 0.3)
    with pytest.raises(SearchError, match="one rate per stage"):
        SearchConfig.create("p-darts", skip_drop=(0.1, 0.4))


def test_pdarts_skip_dropout_schedule_is_train_search_pys():
    """p * (E - e - 1) / E while the architecture is frozen, then p * exp(-0.2 * (e - 10))."""
    import math

    from fastnas.search.methods import get_method

    class Net:
        skip_drop_prob = 0.0

    cfg = SearchConfig.create("p-darts", dataset="cifar10")
    stage = cfg.stages()[0]
    assert (stage["epochs"], stage["warmup"], stage["skip_drop"]) == (25, 10, 0.1)
    expected = [0.1 * (25 - e - 1) / 25 if e < 10 else 0.1 * math.exp(-(e - 10) * 0.2) for e in range(25)]
    net = Net()
    got = []
    for e in range(25):
        get_method("p-darts").on_epoch(net, cfg, stage, e)
        got.append(net.skip_drop_prob)
    assert got == pytest.approx(expected, rel=1e-12)


def test_pcdarts_clips_the_architecture_on_imagenet_only():
    """train_search.py's Architect.step clips nothing; train_search_imagenet.py clips the alphas at 5."""
    assert SearchConfig.create("pc-darts", dataset="cifar10").arch_grad_clip is None
    imagenet = SearchConfig.create("pc-darts", dataset="imagenet")
    assert imagenet.arch_grad_clip == 5.0
    assert (imagenet.batch_size, imagenet.lr, imagenet.arch_lr, imagenet.partial_channels) == (1024, 0.5, 6e-3, 2)
    assert imagenet.warmup_epochs == 35
    assert SearchConfig.create("darts").arch_grad_clip is None


@pytest.mark.parametrize("method", ["p-darts", "darts"])
def test_architecture_gradient_is_clipped_where_set(method, monkeypatch):
    norms = _arch_step_norms(monkeypatch)
    clip = 1e-3
    cfg = _tiny(method, arch_grad_clip=clip)
    result = Searcher(cfg, dataset=tiny_dataset(), progress=False).run()
    assert norms and max(norms) <= clip * (1 + 1e-5)
    assert all(r["arch_grad_clip"] == clip for r in result.history)
    norms.clear()
    result = Searcher(_tiny("darts"), dataset=tiny_dataset(), progress=False).run()
    assert max(norms) > clip and "arch_grad_clip" not in result.history[-1]


def test_arch_grad_clip_is_refused_where_nothing_is_clipped():
    with pytest.raises(SearchError, match="trains no architecture"):
        SearchConfig.create("spos", arch_grad_clip=5.0)
    with pytest.raises(SearchError, match="must be positive"):
        SearchConfig.create("darts", arch_grad_clip=0.0)


# --- SPOS (megvii-model/SinglePathOneShot) ---------------------------------------------------------


def test_spos_defaults_are_the_released_codes():
    """src/Supernet/train.py: CrossEntropyLabelSmooth(1000, 0.1); LambdaLR(1 - step / total_iters)."""
    from fastnas.search.methods import get_method

    cfg = SearchConfig.create("spos", dataset="cifar10", space="nb201")
    assert cfg.label_smoothing == 0.1 and cfg.lr_min == 0.0
    assert get_method("spos").lr_schedule == "linear"
    # Only SPOS' code smooths its labels and decays linearly.
    assert SearchConfig.create("fairnas", space="nb201").label_smoothing == 0.0
    assert get_method("fairnas").lr_schedule == get_method("oneshot").lr_schedule == "cosine"


def test_label_smoothing_is_refused_where_no_supernet_loss_reads_it():
    with pytest.raises(SearchError, match="--label-smoothing is for single-path"):
        SearchConfig.create("darts", label_smoothing=0.1)


def test_spos_linear_schedule_resumes_from_a_cosine_checkpoint():
    """A SPOS checkpoint from before the linear schedule holds a cosine state; it still loads."""
    from fastnas.search.methods import get_method

    cfg = SearchConfig.create("spos", space="nb201", epochs=4, lr=0.2)
    w = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(w, 0.2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    linear = get_method("spos").lr_scheduler(torch.optim.SGD(w, 0.2), cfg, 4)
    linear.load_state_dict(cosine.state_dict())
    lrs = []
    for _ in range(4):
        lrs.append(linear.optimizer.param_groups[0]["lr"])
        linear.optimizer.step()
        linear.step()
    assert lrs == pytest.approx([0.2, 0.15, 0.1, 0.05])


def test_spos_learning_rate_falls_linearly_to_zero(monkeypatch):
    losses = []
    cross_entropy = F.cross_entropy

    def recorded(*args, **kwargs):
        losses.append(kwargs.get("label_smoothing", 0.0))
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", recorded)
    cfg = SearchConfig.create("spos", space="nb201", epochs=4, batch_size=8, init_channels=4, layers=1, lr=0.2)
    result = Searcher(cfg, dataset=tiny_dataset(), progress=False).run()
    assert [r["lr"] for r in result.history] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    # The training steps' loss is smoothed by 0.1.
    assert losses and 0.1 in losses


def test_spos_label_smoothing_is_crossentropylabelsmooth():
    """SPOS' CrossEntropyLabelSmooth (src/Supernet/utils.py), written out, is F.cross_entropy's."""
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 4, 2, 2, 1, 3])
    targets = (1 - 0.1) * F.one_hot(y, 5).double() + 0.1 / 5
    theirs = (-targets * logits.log_softmax(1)).mean(0).sum()
    torch.testing.assert_close(F.cross_entropy(logits, y, label_smoothing=0.1), theirs)


def _spos_supernet(tmp_path, n=48):
    from fastnas.tools.selection import load_supernet

    data = tiny_dataset(n)
    cfg = SearchConfig.create("spos", space="nb201", epochs=1, batch_size=8, init_channels=4, layers=1)
    out = str(tmp_path / "spos")
    Searcher(cfg, out_dir=out, dataset=data, progress=False).run()
    return load_supernet(out, dataset=data)


def test_spos_recalibration_uses_20000_images_capped_by_the_training_half(tmp_path):
    from fastnas.tools.selection import SPOS_BN_IMAGES, SelectSettings

    assert SPOS_BN_IMAGES == 20_000 and SelectSettings().bn_images == 20_000 and SelectSettings().bn_batches is None
    supernet = _spos_supernet(tmp_path)
    images = lambda scorer: sum(len(x) for x in scorer.recalibration)  # noqa: E731
    assert images(supernet.scorer()) == len(supernet.train_idx) < SPOS_BN_IMAGES
    assert images(supernet.scorer(bn_images=20)) == 20
    assert images(supernet.scorer(bn_batches=2, batch_size=8)) == 16
    from fastnas.tools.selection import select

    result = select(supernet.run_dir, SelectSettings("random", candidates=2), progress=False, supernet=supernet)
    assert result.settings["bn_images"] == SPOS_BN_IMAGES
    assert result.settings["bn_images_used"] == len(supernet.train_idx)
    with pytest.raises(SearchError, match="--bn-momentum"):
        SelectSettings(bn_momentum=0.0).validate()


def test_recalibration_with_spos_codes_momentum_is_an_exponential_average():
    """tester.py resets the statistics and runs batches through BatchNorm2d's momentum 0.1."""
    from fastnas.tools.selection import recalibrate_batch_norm

    torch.manual_seed(0)
    net = NB201SearchNetwork(C=4, N=1, num_classes=4)
    net.set_path([(3,), (1,), (2,), (0,), (4,), (3,)])
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    means = []
    hook = net.stem[0].register_forward_hook(lambda m, i, o: means.append(o.mean((0, 2, 3))))
    recalibrate_batch_norm(net, batches, momentum=0.1)
    hook.remove()
    expected = torch.zeros_like(means[0])
    for m in means:
        expected = 0.9 * expected + 0.1 * m
    torch.testing.assert_close(net.stem[1].running_mean, expected, rtol=1e-5, atol=1e-6)
    assert net.stem[1].momentum == 0.1
