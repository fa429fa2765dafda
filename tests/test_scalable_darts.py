"""Scalable-DARTS: the factorised space, its search, its genotype and the networks that build it."""

import json

import pytest
import torch
from search_helpers import assert_state_close, interrupt_at, losses, run, strip_times, tiny_config, tiny_dataset

from fastnas.nn.operations import OPS, split_activation, with_activation
from fastnas.search import SearchConfig, Searcher, SearchError, build_supernet
from fastnas.spaces import DARTS_PRIMITIVES, genotype_from_dict, genotype_to_dict, validate_genotype
from fastnas.spaces.darts.eval_network import NetworkCIFAR
from fastnas.spaces.darts.factorized import SCALABLE_ACTIVATIONS, factorized_candidates

pytestmark = pytest.mark.usefixtures("one_thread")


def test_candidate_names_carry_their_activation():
    assert with_activation("sep_conv_3x3", "relu") == "sep_conv_3x3"
    assert split_activation("dil_conv_5x5_leaky_relu") == ("dil_conv_5x5", "leaky_relu")
    assert split_activation("sep_conv_3x3") == ("sep_conv_3x3", "relu")
    assert split_activation("max_pool_3x3") == ("max_pool_3x3", None)
    with pytest.raises(ValueError, match="no activation"):
        with_activation("max_pool_3x3", "elu")
    m = OPS["sep_conv_3x3_relu6"](4, 1, False)
    assert [type(a) for a in m.modules() if isinstance(a, torch.nn.ReLU6)] == [torch.nn.ReLU6] * 2
    names, operator, activation = factorized_candidates(DARTS_PRIMITIVES, ["relu", "elu"])
    assert len(names) == 4 + 4 * 2 and names[4:6] == ["sep_conv_3x3", "sep_conv_3x3_elu"]
    assert operator[4:6] == [4, 4] and activation[:4] == [None] * 4 and activation[4:6] == [0, 1]


def test_pair_weights_are_products_of_the_factors():
    net = build_supernet(tiny_config("scalable-darts"), 4, 3, 3)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    w, _ = net._weights("normal")
    ops = torch.softmax(net.alphas_normal, -1)
    acts = torch.softmax(net.activation_alphas_normal, -1)
    names = net.cells[0].edges[0].primitives
    for k, name in enumerate(names):
        op, act = split_activation(name)
        o = DARTS_PRIMITIVES.index(op)
        want = ops[:, o] if act is None else ops[:, o] * acts[:, SCALABLE_ACTIVATIONS.index(act)]
        torch.testing.assert_close(w[:, k], want)
    torch.testing.assert_close(w.sum(-1), torch.ones(14))


def test_genotype_records_each_edges_activation_and_networks_build_it(tmp_path):
    net = build_supernet(tiny_config("scalable-darts"), 4, 3, 3)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, DARTS_PRIMITIVES.index("sep_conv_3x3")] = 2.0
        net.alphas_reduce.zero_()
        net.alphas_reduce[:, DARTS_PRIMITIVES.index("max_pool_3x3")] = 2.0
        net.activation_alphas_normal.zero_()
        net.activation_alphas_normal[:, SCALABLE_ACTIVATIONS.index("swish")] = 1.0
        net.activation_alphas_normal[3, SCALABLE_ACTIVATIONS.index("relu")] = 5.0  # edge 3 (0 -> node 1)
    genotype = net.genotype()
    validate_genotype(genotype)
    for pos, (op, j) in enumerate(genotype.normal):
        edge = net._edge_index(pos // 2, j)
        assert op == ("sep_conv_3x3" if edge == 3 else "sep_conv_3x3_swish")
    assert all(op == "max_pool_3x3" for op, _ in genotype.reduce)
    data = json.loads(json.dumps(genotype_to_dict(genotype)))
    assert genotype_from_dict(data) == genotype
    eval_net = NetworkCIFAR(4, 10, 3, False, genotype)
    swish = [m for m in eval_net.modules() if isinstance(m, torch.nn.SiLU)]
    normal_cells = sum(not cell.reduction for cell in eval_net.cells)
    # Two activations in each separable convolution.
    assert len(swish) == normal_cells * 2 * sum(op.endswith("_swish") for op, _ in genotype.normal) > 0
    logits, _ = eval_net(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, 10)


def test_factors_step_one_after_the_other(monkeypatch):
    """Each architecture step takes the operator factor's step, then the activation factor's,
    with the activation gradient taken after the operators moved."""
    from fastnas.search import searcher as searcher_module

    calls = []
    original = searcher_module.first_order_arch_grads

    def spy(net, params, *args, **kwargs):
        calls.append(([id(p) for p in params], net.alphas_normal.detach().clone()))
        return original(net, params, *args, **kwargs)

    monkeypatch.setattr(searcher_module, "first_order_arch_grads", spy)
    _, net = run(tiny_config("scalable-darts"))
    ops = [id(net.alphas_normal), id(net.alphas_reduce)]
    acts = [id(net.activation_alphas_normal), id(net.activation_alphas_reduce)]
    assert [c[0] for c in calls] == [ops, acts] * 2  # two steps
    assert not torch.equal(calls[0][1], calls[1][1])  # the operators moved before the activations' gradient


def test_scalable_search_fused_matches_reference():
    ref, ref_net = run(tiny_config("scalable-darts", backend="reference"))
    got, got_net = run(tiny_config("scalable-darts"))
    plan = got_net.cells[0].edges[0].plan
    # Every pair fused: the depthwise prologue computes each activation.
    assert plan.fused_reason(torch.randn(2, 4, 8, 8), None, training=True) is None
    assert set(plan.spec.activations) == set(SCALABLE_ACTIVATIONS)
    for (a_train, a_val), (r_train, r_val) in zip(losses(got.history), losses(ref.history)):
        assert a_train == pytest.approx(r_train, rel=1e-5, abs=1e-6)
        assert a_val == pytest.approx(r_val, rel=1e-5, abs=1e-6)
    for a, r in zip(got_net.arch_parameters(), ref_net.arch_parameters()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert_state_close(got_net.state_dict(), ref_net.state_dict())
    assert got.genotype == ref.genotype
    record = got.history[-1]
    assert set(record["arch_weights"]) == {"normal", "reduce", "activations_normal", "activations_reduce"}


@pytest.mark.parametrize("memory", ["recompute"])
def test_scalable_search_recomputes(memory):
    ref, ref_net = run(tiny_config("scalable-darts", backend="reference"))
    got, got_net = run(tiny_config("scalable-darts", memory=memory))
    for a, r in zip(got_net.arch_parameters(), ref_net.arch_parameters()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert_state_close(got_net.state_dict(), ref_net.state_dict())


def test_scalable_resume_and_settings(tmp_path, monkeypatch):
    config = dict(epochs=2, activations=("relu", "swish"))
    full, _ = run(tiny_config("scalable-darts", **config), str(tmp_path / "full"))
    out = str(tmp_path / "cut")
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_config("scalable-darts", **config), out)
    resumed = Searcher.resume(out, dataset=tiny_dataset(), progress=False).run()
    assert strip_times(resumed.history) == strip_times(full.history)
    with pytest.raises(SearchError, match="activations"):
        Searcher.resume(out, {"activations": ("relu", "elu")})

    assert SearchConfig.create("scalable-darts").activations == SCALABLE_ACTIVATIONS
    with pytest.raises(SearchError, match="unknown activation"):
        SearchConfig.create("scalable-darts", activations=("relu", "gelu"))
    with pytest.raises(SearchError, match="--activations is for scalable-darts"):
        SearchConfig.create("darts", activations=("relu",))
    with pytest.raises(SearchError, match="full edges"):
        SearchConfig.create("scalable-darts", partial_channels=2)
