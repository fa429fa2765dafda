"""darts_sum and pool_batch_norm_stats on every backend against the eager modules.

The oracle is the DARTS edge written with the eager modules: F.max_pool2d /
F.avg_pool2d followed by F.batch_norm (training, no affine), F.batch_norm on
each convolution candidate, the identity, weighted by coef; its gradients come
from torch.autograd.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_oracle, backend_case, dot_scale, generator, randn, runs_on, skip_unless_runs

pytestmark = pytest.mark.usefixtures("seeded_only")

# The module, not the function of the same name that fastnas.ops exports.
D = importlib.import_module("fastnas.ops.darts_sum")

EPS = 1e-5
FLAGS = [(m, a, s) for m in (False, True) for a in (False, True) for s in (False, True)]
# (N, C, H, W) per Jz: odd sizes, N = 1..3, C = 1..5.
SHAPES = {0: (2, 3, 5, 5), 1: (3, 5, 7, 7), 4: (1, 2, 7, 5), 5: (2, 1, 5, 7)}

case = backend_case("darts_sum", "reference")
stats_case = backend_case("pool_batch_norm_stats", "reference")


def flags_id(f):
    return "max{:d}-avg{:d}-skip{:d}".format(*f)


def oracle(x, zs, coef, stride, has_max, has_avg, has_skip):
    """The eager DARTS edge: candidates as separate modules, weighted by coef."""
    jz = len(zs)

    def bn(t):
        return F.batch_norm(t, None, None, training=True, eps=EPS)

    n, c, h, w = x.shape
    out = torch.zeros(n, c, D.pooled_size(h, stride), D.pooled_size(w, stride), dtype=x.dtype, device=x.device)
    for j, zj in enumerate(zs):
        out = out + coef[j].to(x.dtype) * bn(zj)
    if has_max:
        out = out + coef[jz].to(x.dtype) * bn(F.max_pool2d(x, 3, stride, 1))
    if has_avg:
        out = out + coef[jz + 1].to(x.dtype) * bn(F.avg_pool2d(x, 3, stride, 1, count_include_pad=False))
    if has_skip:
        out = out + coef[jz + 2].to(x.dtype) * x
    return out


def make_inputs(shape, jz, stride, gen, contiguous=True):
    """x (N, C, H, W); zs: Jz tensors (N, C, Ho, Wo); coef (Jz + 3,), all fp64 masters."""
    n, c, h, w = shape
    ho, wo = D.pooled_size(h, stride), D.pooled_size(w, stride)
    x = randn(gen, shape, torch.float64, contiguous=contiguous)
    # Per-channel offsets and scales, as pre-BN activations have.
    zs = [
        randn(gen, (n, c, ho, wo), torch.float64) * (1 + torch.rand(1, c, 1, 1, generator=gen, dtype=torch.float64))
        + randn(gen, (1, c, 1, 1), torch.float64)
        for _ in range(jz)
    ]
    coef = torch.softmax(randn(gen, (jz + 3,), torch.float64), 0)
    return x, zs, coef


def stack(zs, like):
    """(Jz, C, N, Ho, Wo) channel-major, as the ops take them."""
    n, c, h, w = like.shape
    if not zs:
        return like.new_empty((0, c, n, h, w))
    return torch.stack([z.transpose(0, 1) for z in zs]).contiguous()


def stats_of(x, zs, stride, stat_dtype):
    """Exact batch statistics in fp64, rounded to stat_dtype: z rows, max, avg."""
    x64 = x.double()
    mean, var = [], []
    for z in zs:
        v, m = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
        mean.append(m)
        var.append(v)
    for p in (F.max_pool2d(x64, 3, stride, 1), F.avg_pool2d(x64, 3, stride, 1, count_include_pad=False)):
        v, m = torch.var_mean(p, dim=(0, 2, 3), correction=0)
        mean.append(m)
        var.append(v)
    mean, var = torch.stack(mean), torch.stack(var)
    return mean.to(stat_dtype), torch.rsqrt(var + EPS).to(stat_dtype)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_case(name, device, shape, jz, stride, flags, dtype, contiguous=True, seed=0):
    """Forward and backward of one configuration against the oracle."""
    gen = generator("darts_sum", shape, jz, stride, flags, dtype, contiguous, seed)
    x64, zs64, coef64 = make_inputs(shape, jz, stride, gen, contiguous)
    acc = acc_of(dtype)
    mean, rstd = stats_of(x64, zs64, stride, acc)
    g64 = None

    # The oracle in fp64 (the truth) and in dtype (its own rounding error).
    def oracle_grads(dt):
        nonlocal g64
        x = x64.to(dt).requires_grad_(True)
        zs = [z.to(dt).requires_grad_(True) for z in zs64]
        coef = coef64.to(acc_of(dt)).requires_grad_(True)
        out = oracle(x, zs, coef, stride, *flags)
        if g64 is None:
            g64 = randn(gen, out.shape, torch.float64)
        g = g64.to(dt)
        inputs = [x, *zs, coef]
        if out.requires_grad:
            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
        else:  # the edge is "none" only
            grads = [None] * len(inputs)
        gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
        gz = stack([t for t in grads[1 : 1 + jz]], out)
        gc = grads[-1] if grads[-1] is not None else torch.zeros_like(coef)
        return out.detach(), g, gx, gz, gc

    out64, g64, gx64, gz64, gc64 = oracle_grads(torch.float64)
    outl, gl, gxl, gzl, gcl = oracle_grads(dtype)

    x = x64.to(device=device, dtype=dtype)
    if not contiguous:
        x = torch.empty(*shape[:3], 2 * shape[3] + 1, dtype=dtype, device=device)[..., 1::2].copy_(x)
    z = stack([t.to(dtype) for t in zs64], out64.to(dtype)).to(device)
    mean, rstd, coef = mean.to(device), rstd.to(device), coef64.to(device=device, dtype=acc)
    g = gl.to(device)
    with runs_on(name, "darts_sum", "darts_sum_backward"):
        out = D.darts_sum(x, z, mean, rstd, coef, stride, *flags, backend=name)
        grad_z, grad_x, grad_coef = D.darts_sum_backward(g, x, z, mean, rstd, coef, stride, *flags, backend=name)
    assert out.dtype == dtype and out.is_contiguous()
    assert_oracle(out, outl, out64, "out")
    assert grad_z.shape == z.shape and grad_z.dtype == dtype
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    assert grad_coef.shape == (jz + 3,) and grad_coef.dtype == acc
    assert_oracle(grad_x, gxl, gx64, "grad_x")
    assert_oracle(grad_z, gzl, gz64, "grad_z")
    # A reduction over N*Ho*Wo terms g * yhat (|yhat| a few units at most).
    assert_oracle(grad_coef, gcl, gc64, "grad_coef", scale=dot_scale(g64) * 3, reduction=True)
    return out, grad_z, grad_x, grad_coef


# -- pool_batch_norm_stats ---------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 5, 7, 7), (3, 1, 5, 7), (2, 4, 1, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pool_batch_norm_stats(stats_case, shape, stride, dtype):
    name, device = stats_case
    x64 = randn(generator("pool stats", shape, stride, dtype), shape, torch.float64, loc=0.5, scale=2.0)
    x = x64.to(dtype)
    with runs_on(name, "pool_batch_norm_stats"):
        got = D.pool_batch_norm_stats(x.to(device), stride, EPS, backend=name)
    lowp = D.pool_batch_norm_stats_reference(x, stride, EPS)
    acc = acc_of(dtype)
    for t in got:
        assert t.shape == (2, shape[1]) and t.dtype == acc
    # The truth from the eager pools, row 0 the max pool, row 1 the avg pool.
    truth = []
    for p in (F.max_pool2d(x64, 3, stride, 1), F.avg_pool2d(x64, 3, stride, 1, count_include_pad=False)):
        v, m = torch.var_mean(p, dim=(0, 2, 3), correction=0)
        truth.append((m, torch.rsqrt(v + EPS), v))
    for i, what in enumerate(("mean", "rstd", "var")):
        want = torch.stack([truth[0][i], truth[1][i]])
        assert_oracle(got[i], lowp[i], want, what, reduction=True)


def test_pool_batch_norm_stats_non_contiguous(stats_case):
    name, device = stats_case
    x = randn(generator("pool stats strided"), (2, 3, 7, 7), torch.float32, device, contiguous=False)
    with runs_on(name, "pool_batch_norm_stats"):
        got = D.pool_batch_norm_stats(x, 2, backend=name)
    lowp = D.pool_batch_norm_stats_reference(x.contiguous(), 2)
    truth = D.pool_batch_norm_stats_reference(x.double(), 2)
    for a, lo, t, what in zip(got, lowp, truth, ("mean", "rstd", "var")):
        assert_oracle(a, lo, t, what, reduction=True)


# -- darts_sum forward and backward vs the oracle ----------------------------------


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("flags", FLAGS, ids=flags_id)
@pytest.mark.parametrize("jz", [0, 1, 4, 5])
def test_darts_sum_float64(case, jz, flags, stride):
    if flags[2] and stride != 1:
        pytest.skip("skip_connect is the identity only on stride 1")
    name, device = case
    run_case(name, device, SHAPES[jz], jz, stride, flags, torch.float64)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "flags",
    [(True, True, True), (True, False, False), (False, True, True), (False, False, False)],
    ids=flags_id,
)
@pytest.mark.parametrize("jz", [0, 1, 4, 5])
def test_darts_sum_float32(case, jz, flags, stride):
    if flags[2] and stride != 1:
        pytest.skip("skip_connect is the identity only on stride 1")
    name, device = case
    run_case(name, device, SHAPES[jz], jz, stride, flags, torch.float32, seed=jz)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_darts_sum_low_precision(case, dtype, stride):
    name, device = case
    run_case(name, device, (2, 3, 7, 7), 2, stride, (True, True, stride == 1), dtype)


@pytest.mark.parametrize("stride", [1, 2])
def test_darts_sum_non_contiguous_x(case, stride):
    name, device = case
    run_case(name, device, (2, 3, 7, 5), 1, stride, (True, True, stride == 1), torch.float32, contiguous=False)


def test_poisoned_outputs(case, poison_empty):
    """Every output element is written, including with no candidate at all."""
    name, device = case
    for jz, flags in ((2, (True, True, True)), (0, (False, False, False)), (1, (False, True, False))):
        run_case(name, device, (2, 3, 5, 7), jz, 1, flags, torch.float32)
    run_case(name, device, (1, 2, 7, 7), 1, 2, (True, False, False), torch.float64)


def test_bit_identical_reruns(case):
    name, device = case
    first = run_case(name, device, (3, 4, 7, 7), 4, 1, (True, True, True), torch.float32)
    second = run_case(name, device, (3, 4, 7, 7), 4, 1, (True, True, True), torch.float32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_x_need_grad_false(case):
    name, device = case
    gen = generator("x_need_grad")
    x, zs, coef = make_inputs((2, 3, 5, 5), 2, 1, gen)
    mean, rstd = stats_of(x, zs, 1, torch.float32)
    x, coef = x.float(), coef.float()
    z = stack([t.float() for t in zs], torch.empty(2, 3, 5, 5))
    g = randn(gen, (2, 3, 5, 5))
    args = [t.to(device) for t in (g, x, z, mean, rstd, coef)]
    with runs_on(name, "darts_sum_backward"):
        full = D.darts_sum_backward(*args, 1, True, True, True, True, backend=name)
        part = D.darts_sum_backward(*args, 1, True, True, True, False, backend=name)
    assert part[1].numel() == 0
    assert torch.equal(full[0], part[0]) and torch.equal(full[2], part[2])


# -- autograd through the op -------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_autograd_matches_oracle(case, stride):
    name, device = case
    gen = generator("autograd", stride)
    x64, zs64, coef64 = make_inputs((2, 3, 7, 7), 2, stride, gen)
    flags = (True, True, stride == 1)
    mean, rstd = stats_of(x64, zs64, stride, torch.float64)
    x = x64.clone().requires_grad_(True)
    zs = [t.clone().requires_grad_(True) for t in zs64]
    coef = coef64.clone().requires_grad_(True)
    out_ref = oracle(x, zs, coef, stride, *flags)
    g = randn(gen, out_ref.shape, torch.float64)
    want = torch.autograd.grad(out_ref, [x, *zs, coef], g)

    xd = x64.to(device).requires_grad_(True)
    zd = stack(zs64, out_ref.detach()).to(device).requires_grad_(True)
    cd = coef64.to(device).requires_grad_(True)
    with runs_on(name, "darts_sum", "darts_sum_backward"):
        out = D.darts_sum(xd, zd, mean.to(device), rstd.to(device), cd, stride, *flags, backend=name)
        gx, gz, gc = torch.autograd.grad(out, [xd, zd, cd], g.to(device))
    assert_oracle(gx, None, want[0], "grad_x")
    assert_oracle(gz, None, stack(list(want[1:3]), out_ref), "grad_z")
    assert_oracle(gc, None, want[3], "grad_coef", scale=dot_scale(g) * 3)


# -- bad input ---------------------------------------------------------------------


def _good(device="cpu", dtype=torch.float32):
    x = torch.zeros(2, 3, 5, 5, device=device, dtype=dtype)
    z = torch.zeros(1, 3, 2, 5, 5, device=device, dtype=dtype)
    mean = torch.zeros(3, 3, device=device)
    rstd = torch.ones(3, 3, device=device)
    coef = torch.ones(4, device=device)
    return x, z, mean, rstd, coef


BAD = [
    ("x", lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "x has dtype"),
    ("x", lambda a: a.__setitem__(0, a[0][0]), ValueError, "x must be a 4-D"),
    ("z", lambda a: a.__setitem__(1, a[1][:, :2]), ValueError, "z must be"),
    ("z", lambda a: a.__setitem__(1, a[1].double()), TypeError, "z has dtype"),
    ("mean", lambda a: a.__setitem__(2, a[2][:2]), ValueError, "mean must have shape"),
    ("rstd", lambda a: a.__setitem__(3, a[3].half()), TypeError, "rstd has dtype"),
    ("coef", lambda a: a.__setitem__(4, a[4][:3]), ValueError, "coef must have shape"),
    ("coef", lambda a: a.__setitem__(4, a[4].to("meta")), ValueError, "coef is on meta"),
    ("stride", lambda a: a.__setitem__(5, 0), ValueError, "stride must be >= 1"),
    ("has_skip", lambda a: a.__setitem__(5, 2), ValueError, "has_skip=True"),
    ("has_max", lambda a: a.__setitem__(6, 1), TypeError, "has_max must be a bool"),
]


@pytest.mark.parametrize("what,mutate,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(case, what, mutate, exc, msg):
    name, _ = case
    args = [*_good(), 1, True, True, True]
    mutate(args)
    if what == "has_skip":
        # Stride 2 needs z of the pooled size.
        args[1] = torch.zeros(1, 3, 2, 3, 3)
    with pytest.raises(exc, match=msg):
        D.darts_sum(*args, backend=name)
    g = torch.zeros(2, 3, 5, 5)
    with pytest.raises(exc, match=msg):
        D.darts_sum_backward(g, *args, backend=name)


def test_bad_grad_out_and_flags():
    x, z, mean, rstd, coef = _good()
    with pytest.raises(ValueError, match="grad_out must have shape"):
        D.darts_sum_backward(torch.zeros(2, 3, 4, 5), x, z, mean, rstd, coef, 1, True, True, True)
    with pytest.raises(TypeError, match="grad_out has dtype"):
        D.darts_sum_backward(torch.zeros(2, 3, 5, 5).double(), x, z, mean, rstd, coef, 1, True, True, True)
    with pytest.raises(TypeError, match="x_need_grad must be a bool"):
        D.darts_sum_backward(torch.zeros(2, 3, 5, 5), x, z, mean, rstd, coef, 1, True, True, True, 1)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        D.pool_batch_norm_stats(x, 0)
    with pytest.raises(TypeError, match="x has dtype"):
        D.pool_batch_norm_stats(x.long(), 1)


def test_cpp_checks_name_the_argument():
    skip_unless_runs("darts_sum", "cpu")
    ops = torch.ops.fastnas
    x, z, mean, rstd, coef = _good()
    with pytest.raises(RuntimeError, match="z must be"):
        ops.darts_sum(x, z[:, :2], mean, rstd, coef, 1, True, True, True)
    with pytest.raises(RuntimeError, match="has_skip=True"):
        ops.darts_sum(x, z, mean, rstd, coef, 2, True, True, True)
    with pytest.raises(RuntimeError, match="coef must be"):
        ops.darts_sum(x, z, mean, rstd, coef[:2], 1, True, True, True)
    with pytest.raises(RuntimeError, match="mean has dtype"):
        ops.darts_sum(x, z, mean.long(), rstd, coef, 1, True, True, True)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        ops.darts_sum_backward(x[:, :, :4], x, z, mean, rstd, coef, 1, True, True, True, True)
    with pytest.raises(RuntimeError, match="x has dtype"):
        ops.pool_batch_norm_stats(x.long(), 1, 1e-5)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        ops.pool_batch_norm_stats(x, 0, 1e-5)


# -- opcheck: schema, fake tensors, autograd registration --------------------------


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(case, suffix):
    name, device = case
    if name == "reference" or (suffix == "_triton") != (name == "triton"):
        pytest.skip("op belongs to another backend")
    ops = torch.ops.fastnas
    gen = generator("opcheck")
    configs = [(1, (True, True, True)), (2, (True, False, False))]
    # The interpreter is slow; one configuration exercises the Triton ops' registration.
    for stride, flags in configs[:1] if name == "triton" and device.type == "cpu" else configs:
        x64, zs, coef = make_inputs((2, 3, 5, 5), 2, stride, gen)
        mean, rstd = stats_of(x64, zs, stride, torch.float32)
        n, c, ho, wo = zs[0].shape
        x = x64.float().to(device).requires_grad_(True)
        z = stack([t.float() for t in zs], torch.empty(n, c, ho, wo)).to(device).requires_grad_(True)
        coef = coef.float().to(device).requires_grad_(True)
        mean, rstd = mean.to(device), rstd.to(device)
        g = randn(gen, (n, c, ho, wo), torch.float32, device)
        torch.library.opcheck(getattr(ops, "pool_batch_norm_stats" + suffix), (x.detach(), stride, EPS))
        torch.library.opcheck(getattr(ops, "darts_sum" + suffix), (x, z, mean, rstd, coef, stride, *flags))
        bw = getattr(ops, "darts_sum_backward" + suffix)
        args = (g, x.detach(), z.detach(), mean, rstd, coef.detach(), stride, *flags)
        torch.library.opcheck(bw, (*args, True))
        torch.library.opcheck(bw, (*args, False))


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_ties_go_to_first_maximum(case, stride):
    """Small integers make many ties: the gradient goes where max_pool2d sends it."""
    name, device = case
    gen = generator("ties", stride)
    x = torch.randint(0, 3, (2, 3, 7, 7), generator=gen).double()
    ho = D.pooled_size(7, stride)
    flags = (True, False, False)
    mean, rstd = stats_of(x, [], stride, torch.float64)
    coef = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    out = oracle(xr, [], coef, stride, *flags)
    g = randn(gen, out.shape, torch.float64)
    (want,) = torch.autograd.grad(out, [xr], g)
    z = torch.empty(0, 3, 2, ho, ho, dtype=torch.float64)
    args = [t.to(device) for t in (g, x, z, mean, rstd, coef)]
    with runs_on(name, "darts_sum_backward"):
        _, grad_x, _ = D.darts_sum_backward(*args, stride, *flags, backend=name)
    assert_oracle(grad_x, None, want, "grad_x")
