import json

import pytest
import torch
from PIL import Image

from fastnas.nn import MixedOp
from fastnas.spaces import (
    DARTS_PRIMITIVES,
    NB201_PRIMITIVES,
    Genotype,
    NB201Arch,
    NB201SearchNetwork,
    SearchNetwork,
    genotype_from_dict,
    genotype_to_dict,
    plot_genotype,
    plot_nb201,
    validate_genotype,
)

TINY = dict(C=4, layers=3, num_classes=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kwargs):
    torch.manual_seed(0)
    return SearchNetwork(**{**TINY, **kwargs})


def _step(net, x):
    for p in net.parameters():
        p.grad = None
    out = net(x)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in net.arch_parameters()], [p.grad for p in net.weight_parameters()]


def test_parameter_groups_are_disjoint_registered_and_complete():
    net = _tiny(partial_channels=2)
    arch, weights = net.arch_parameters(), net.weight_parameters()
    assert [tuple(p.shape) for p in arch] == [(14, 8), (14, 8), (14,), (14,)]
    assert {id(p) for p in arch}.isdisjoint({id(p) for p in weights})
    assert len(arch) + len(weights) == len(list(net.parameters()))
    assert {"alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"} <= set(net.state_dict())
    assert arch[0].abs().max() < 0.01
    assert len(_tiny().arch_parameters()) == 2
    assert len(_tiny(edge_normalization=True).arch_parameters()) == 4


def test_reduction_cells_at_one_and_two_thirds():
    net = _tiny(layers=6)
    assert [c.reduction for c in net.cells] == [False, False, True, False, True, False]


@pytest.mark.parametrize("partial_channels", [None, 2])
def test_forward_backward_matches_between_auto_and_reference_backend(partial_channels, fused_edge_calls):
    """In float64, so that the two differ only by rounding far below any tolerance;
    float32 networks are held to the oracle rule in test_precision.py."""
    ref = _tiny(partial_channels=partial_channels, backend="reference").double()
    auto = _tiny(partial_channels=partial_channels).double()
    auto.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out_r, arch_r, w_r = _step(ref, x)
    assert not fused_edge_calls
    out_a, arch_a, w_a = _step(auto, x)
    assert len(fused_edge_calls) == 3 * 14, "every edge of the automatic network must run the fused edge"
    assert out_r.shape == (2, 3)
    torch.testing.assert_close(out_a, out_r, rtol=1e-9, atol=1e-10)
    for a, b in zip(arch_a + w_a, arch_r + w_r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in arch_r)


def test_checkpoint_memory_network_equals_save():
    save = _tiny()
    ckpt = _tiny(memory="checkpoint")
    ckpt.load_state_dict(save.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for a, b in zip(_step(ckpt, x)[1:], _step(save, x)[1:]):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb)


def test_genotype_is_valid_and_round_trips(tmp_path):
    net = _tiny()
    genotype = net.genotype()
    validate_genotype(genotype)
    assert genotype.normal_concat == [2, 3, 4, 5]
    for pos, (op, j) in enumerate(genotype.normal):
        assert op != "none" and op in DARTS_PRIMITIVES and j < 2 + pos // 2
    # The two edges of a node come from different states.
    for node in range(4):
        assert genotype.normal[2 * node][1] != genotype.normal[2 * node + 1][1]
    data = json.loads(json.dumps(genotype_to_dict(genotype)))
    assert genotype_from_dict(data) == Genotype(*[list(v) for v in genotype])
    with pytest.raises(ValueError, match="lacks"):
        genotype_from_dict({"normal": []})
    plot_genotype(genotype, tmp_path / "cells.png")
    with Image.open(tmp_path / "cells.png") as im:
        assert im.format == "PNG" and im.width > 100


def test_genotype_excludes_none_and_follows_strongest_edges():
    net = _tiny()
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, 0] = 10.0  # none dominates everywhere
        net.alphas_normal[1, 4] = 5.0  # node 0: state 1 via sep_conv_3x3
        net.alphas_normal[0, 6] = 4.0  # node 0: state 0 via dil_conv_3x3
    genotype = net.genotype()
    assert genotype.normal[:2] == [("sep_conv_3x3", 1), ("dil_conv_3x3", 0)]
    assert all(op != "none" for op, _ in genotype.normal + genotype.reduce)


def test_edge_betas_weight_the_genotype():
    net = _tiny(partial_channels=2)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.zero_()
        net.alphas_normal[2:5, 4] = 1.0  # node 1's three edges favour sep_conv_3x3 equally
        net.alphas_normal[2, 4] = 1.1  # edge from state 0 slightly ahead by alpha ...
        net.betas_normal[3:5] = 2.0  # ... but states 1 and 2 win by beta
    assert sorted(j for _, j in net.genotype().normal[2:4]) == [1, 2]
    weights = net.arch_weights()
    torch.testing.assert_close(weights["betas_normal"][2:5].sum(), torch.tensor(1.0))
    assert set(net.arch_entropy()) == {"normal", "reduce"}


def test_max_skip_connect_caps_the_normal_cell():
    net = _tiny()
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, 3] = torch.linspace(2.0, 3.0, 14)  # skip_connect strongest on every edge
        net.alphas_normal[:, 5] = 1.0  # then sep_conv_5x5
    assert sum(op == "skip_connect" for op, _ in net.genotype().normal) == 8
    capped = net.genotype(max_skip_connect=2)
    validate_genotype(capped)
    skips = [(op, j) for op, j in capped.normal if op == "skip_connect"]
    assert len(skips) == 2
    # The survivors are the strongest: the edges into the last node.
    assert all(pos >= 6 for pos, (op, _) in enumerate(capped.normal) if op == "skip_connect")


def test_edge_primitives_give_each_edge_its_candidates():
    normal = [["skip_connect", "sep_conv_3x3"]] * 7 + [["max_pool_3x3", "dil_conv_3x3"]] * 7
    reduce = [["avg_pool_3x3", "sep_conv_5x5"]] * 14
    net = _tiny(edge_primitives={"normal": normal, "reduce": reduce})
    assert net.alphas_normal.shape == (14, 2)
    assert net.edge_candidates() == {"normal": normal, "reduce": reduce}
    assert net.cells[0].edges[13].primitives == ["max_pool_3x3", "dil_conv_3x3"]
    _step(net, torch.randn(1, 3, 8, 8))
    ops = {op for op, _ in net.genotype().normal}
    assert ops <= {"skip_connect", "sep_conv_3x3", "max_pool_3x3", "dil_conv_3x3"}
    with pytest.raises(ValueError, match="same number"):
        _tiny(edge_primitives={"normal": [["skip_connect"]] + normal[1:], "reduce": reduce})


def test_skip_drop_prob_reaches_every_mixed_op():
    net = _tiny()
    assert net.skip_drop_prob == 0.0
    net.skip_drop_prob = 0.3
    assert all(m.skip_drop_prob == 0.3 for m in net.modules() if isinstance(m, MixedOp))
    with pytest.raises(ValueError):
        net.skip_drop_prob = 1.5


def test_gumbel_sampling_runs_only_the_sampled_candidate():
    net = _tiny()
    net.set_sampling("gumbel", tau=1.0)
    calls = {}
    for name, module in net.named_modules():
        if isinstance(module, MixedOp):
            for k, candidate in enumerate(module.ops):
                key = (name, k)
                candidate.register_forward_hook(lambda m, i, o, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
    _, arch_grads, _ = _step(net, torch.randn(2, 3, 8, 8))
    edges = [n for n, m in net.named_modules() if isinstance(m, MixedOp)]
    per_edge = {e: sum(v for (n, _), v in calls.items() if n == e) for e in edges}
    assert set(per_edge.values()) == {1}
    assert all(g is not None and g.abs().sum() > 0 for g in arch_grads)
    with pytest.raises(ValueError):
        net.set_sampling("argmax")


def test_imagenet_stem_takes_224_to_28():
    net = SearchNetwork(C=4, layers=3, num_classes=5, stem="imagenet", partial_channels=2)
    sizes = []
    net.cells[0].register_forward_hook(lambda m, i, o: sizes.append((i[0].shape[-1], i[1].shape[-1])))
    out, arch_grads, weight_grads = _step(net, torch.randn(1, 3, 224, 224))
    assert sizes == [(56, 28)] and out.shape == (1, 5)
    assert all(g is not None for g in arch_grads + weight_grads)


def test_nb201_forward_backward_and_arch_string():
    torch.manual_seed(0)
    net = NB201SearchNetwork(C=4, N=1, num_classes=3)
    assert net.alphas.shape == (6, 5) and len(NB201_PRIMITIVES) ** 6 == 15625
    out, arch_grads, weight_grads = _step(net, torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 3) and arch_grads[0].abs().sum() > 0
    assert len(net.weight_parameters()) == len(list(net.parameters())) - 1
    arch = net.genotype()
    text = arch.to_string()
    assert text.count("+") == 2 and text.startswith("|") and text.endswith("|")
    assert NB201Arch.from_string(text) == arch
    assert NB201Arch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    net.set_sampling("gumbel", tau=2.0)
    # A sample can cut the cell off (node 1 = none, then only convolutions of
    # zeros), giving zero gradients; a few samples cannot all do so.
    net.alphas.grad = None
    for _ in range(4):
        net(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert net.alphas.grad.abs().sum() > 0


def test_nb201_arch_format_and_errors(tmp_path):
    text = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    arch = NB201Arch.from_string(text)
    assert arch.nodes[1] == (("none", 0), ("skip_connect", 1)) and str(arch) == text
    for bad in ["nor_conv_3x3~0", "|nor_conv_3x3|", "|nor_conv_3x3~1|", "|a~0|+|b~0|"]:
        with pytest.raises(ValueError):
            NB201Arch.from_string(bad)
    plot_nb201(arch, tmp_path / "cell.png")
    with Image.open(tmp_path / "cell.png") as im:
        assert im.format == "PNG"
