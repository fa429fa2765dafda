"""What the op tests share: the backends each op runs on, seeded data, the float64 oracle rule, and a spy that
says which backend ran.

The oracle rule (STYLE.md rule 4, the rule of flash-attention's tests): the truth is the eager reference run
in float64 on float64 copies of the same inputs. A float32, float16 or bfloat16 result may be off the truth by at
most twice what the eager reference run in that same dtype is off by,

    max|got - truth| <= 2 * max|reference - truth| + FLOOR_ULPS * eps(dtype) * scale + tiny(dtype),

where ``scale`` is max|truth| and ``tiny`` the smallest normal number. The floor, one unit in the last place of
the scale, only matters where the reference happens to be exact, for instance on exact zeros.

A reduction (``reduction=True``: a weights' gradient, a batch statistic) is the one place where the rule needs
more: the kernels sum in a fixed blocked order, for bit-identical reruns, while the eager reference's
vectorised pairwise sum can be exact by luck. Its floor is REDUCTION_ULPS units of the float32 accumulator at the
scale the test gives, the magnitude the rounding error of the sum grows with (``dot_scale``: sum |terms| /
sqrt(count)), or max|truth| for a mean. (The per-file rules this replaces added 2e-6 to 1.6e-2 of max(scale, 1)
to the 2x term; both floors here are lower.)

A float64 result has no lower precision to compare with: it must be within ``fp64_rtol * max(scale, 1)`` of the
truth (1e-12 unless a test says otherwise).

Every test draws its data from its own seeded generator (``generator(...)``), so a run does not depend on the
tests before it (the ``seeded_only`` fixture of conftest.py fails a test that draws from torch's global
generators), and a fused-vs-reference test wraps the fused calls in ``runs_on(backend, op, ...)``, which fails
unless that backend's kernels of those ops ran (so a missing kernel cannot pass by running the reference).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnas import backends

FLOOR_ULPS = 1
REDUCTION_ULPS = 8
FP64_RTOL = 1e-12
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)

# --- which backends run each op, on which device -------------------------------------------


class Case(NamedTuple):
    backend: str
    device: torch.device


_CASES = {
    "reference": ("reference", "cpu", ()),
    "cpu": ("cpu", "cpu", ()),
    "triton-interpreter": ("triton", "cpu", ()),
    "reference-cuda": ("reference", "cuda", (pytest.mark.requires_cuda,)),
    "cuda": ("cuda", "cuda", (pytest.mark.requires_cuda,)),
    "triton-cuda": ("triton", "cuda", (pytest.mark.requires_cuda,)),
}
FUSED = ("cpu", "triton-interpreter", "cuda", "triton-cuda")


def cases(*ids: str) -> list:
    """pytest params of the (backend, device) cases named by ``ids`` (keys of ``_CASES``)."""
    return [pytest.param((name, device), id=i, marks=marks) for i in ids for name, device, marks in [_CASES[i]]]


def interpreted(case) -> bool:
    """Whether ``case`` runs Triton kernels in the interpreter, one program at a time on the CPU (slow)."""
    name, device = case
    return name == "triton" and torch.device(device).type == "cpu"


def skip_unless_runs(op: str, name: str) -> None:
    """Skip, with the reason, unless backend ``name`` works here and implements ``op`` in this build."""
    why = backends.backend_status()[name]
    if not why and name not in backends.implementations(op):
        why = f"this build has no {name} kernel for {op}"
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")


def backend_case(op: str, *ids: str):
    """A ``case`` fixture over the fused backends (and any extra ``ids``, such as "reference") for ``op``;
    each case is a ``Case(backend, device)``, skipped with the reason where it cannot run."""

    @pytest.fixture(params=cases(*ids, *FUSED))
    def case(request) -> Case:
        name, device = request.param
        skip_unless_runs(op, name)
        return Case(name, torch.device(device))

    return case


# --- seeded data ----------------------------------------------------------------------------


def generator(*key) -> torch.Generator:
    """A CPU generator seeded from ``key`` (any reprs: names, parameters), the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(gen, shape, dtype=torch.float32, device="cpu", *, contiguous=True, loc=0.0, scale=1.0, requires_grad=False):
    """Normal data drawn in float64 on the CPU from ``gen``, then cast and moved: the same values on every
    device. ``contiguous=False`` gives a strided view (every other element of the last dim) of a larger tensor."""
    shape = tuple(shape)
    if contiguous:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc).to(device=device, dtype=dtype)
    else:
        wide = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen, dtype=torch.float64) * scale + loc
        t = wide.to(device=device, dtype=dtype)[..., 1::2]
        assert t.numel() <= 1 or not t.is_contiguous()
    return t.requires_grad_(requires_grad)


def to64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``t``, a leaf that requires grad as ``t`` does."""
    return t.detach().double().requires_grad_(t.requires_grad)


def grads_of(out, grad_out, tensors):
    """Gradients of ``out`` for ``tensors``, None for those that need none."""
    need = [t for t in tensors if t.requires_grad]
    it = iter(torch.autograd.grad(out, need, grad_out) if need else [])
    return [next(it) if t.requires_grad else None for t in tensors]


# multi_depthwise's inputs, drawn by its tests and the activations': (N, C, H, W), odd sizes.
DEPTHWISE_SHAPES = [(1, 1, 5, 5), (2, 3, 7, 7), (3, 6, 9, 9), (2, 5, 7, 9)]
# The interpreter runs one (channel, image) program at a time: there the same odd sizes get fewer programs.
_INTERPRETER_SHAPES = {(2, 3, 7, 7): (2, 2, 7, 7), (3, 6, 9, 9): (1, 3, 9, 9), (2, 5, 7, 9): (2, 2, 7, 9)}


def sized(case, shape):
    """``shape``, or its smaller stand-in where ``case`` runs under the Triton interpreter."""
    return _INTERPRETER_SHAPES.get(shape, shape) if interpreted(case) else shape


def depthwise_inputs(cands, mode, shape, dtype, device, seed):
    """(x, weights, dilations, mean, rstd) of a multi_depthwise call on ``cands`` ((kernel size, dilation)
    each): one shared x (``mode`` "shared") or one per candidate, with batch statistics ("batch-norm")."""
    gen = generator("multi_depthwise", seed)
    n, c, h, w = shape
    j = len(cands)
    x_shape = (n, c, h, w) if mode == "shared" else (j, c, n, h, w)
    x = randn(gen, x_shape, dtype, device)
    weights = [randn(gen, (c, 1, k, k), dtype, device) for k, _ in cands]
    dilations = [d for _, d in cands]
    mean = rstd = None
    if mode == "batch-norm":
        mean = randn(gen, (j, c), torch.float32, device, scale=0.5)
        rstd = (0.5 + torch.rand((j, c), generator=gen)).float().to(device)
    return x, weights, dilations, mean, rstd


# --- the oracle rule ------------------------------------------------------------------------


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def assert_oracle(
    got, lowp, truth, what: str, *, scale: float | None = None, reduction: bool = False, fp64_rtol: float = FP64_RTOL
):
    """``got`` against the float64 ``truth`` by the rule in the module docstring; ``lowp`` is the eager
    reference's result in got's dtype (None for a float64 ``got``)."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert lowp is None or got.dtype == lowp.dtype, f"{what}: dtype {got.dtype} != {lowp.dtype}"
    got64 = got.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values (an unwritten output?)"
    scale = _max_abs(truth) if scale is None else scale
    err = _max_abs(got64 - truth)
    if got.dtype == torch.float64:
        bound = fp64_rtol * max(scale, 1.0)
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (float64)"
        return
    assert got.dtype in LOW_PRECISION, f"{what}: no oracle rule for {got.dtype}"
    ref_err = _max_abs(lowp.detach().double().cpu() - truth)
    info = torch.finfo(got.dtype)
    floor = REDUCTION_ULPS * torch.finfo(torch.float32).eps if reduction else FLOOR_ULPS * info.eps
    bound = 2 * ref_err + floor * scale + info.tiny
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


def dot_scale(*factors: torch.Tensor, terms: int | None = None) -> float:
    """The magnitude a sum of products' rounding error grows with: sum |f1 * f2 * ...| / sqrt(terms)
    (a random walk of one rounding per term)."""
    prod = factors[0].detach().double().abs().cpu()
    for f in factors[1:]:
        prod = prod * f.detach().double().abs().cpu()
    n = prod.numel() if terms is None else terms
    return prod.sum().item() / max(1, n) ** 0.5


# --- which backend ran ----------------------------------------------------------------------


class _Spy(TorchDispatchMode):
    """Records every fastnas op that reaches a kernel: (op without "_triton", "triton" or the device type)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastnas":
            name = func._schema.name.split("::", 1)[1]
            if "_triton" in name:
                self.calls.append((name.replace("_triton", ""), "triton"))
            else:
                tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                self.calls.append((name, tensors[0].device.type if tensors else "?"))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def runs_on(backend: str, *ops: str, others: tuple[str, ...] = ("update_running_stats",)):
    """Fails unless, inside the block, the kernels of ``backend`` ran each of ``ops`` (their C++ names, such as
    "mixed_sum" and "mixed_sum_backward") and no other backend ran a fastnas op; for "reference", unless no
    fastnas kernel ran at all. ``others`` are Python-only fastnas ops that every backend calls."""
    spy = _Spy()
    with spy:
        yield spy
    calls = [c for c in spy.calls if c[0] not in others]
    if backend == "reference":
        assert not calls, f"the reference backend was asked for, but fastnas kernels ran: {calls}"
        return
    for op in ops:
        assert (op, backend) in calls, f"{backend} was asked for, but its {op} kernel did not run (ran: {calls})"
    strays = [c for c in calls if c[1] != backend]
    assert not strays, f"{backend} was asked for, but other kernels ran: {strays}"


def compile_recording(fn):
    """``torch.compile(fn, fullgraph=True)`` with Inductor, and the set of fastnas ops in the graphs it
    captured (as "name" or "name_triton"), to tell which backend the compiled code calls."""
    from torch._inductor.compile_fx import compile_fx

    seen: set[str] = set()

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("fastnas."):
                seen.add(str(node.target).split(".")[1])
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend), seen


def assert_compiled_with(backend: str, seen: set[str], *ops: str) -> None:
    """The graphs ``compile_recording`` saw call ``backend``'s ``ops`` (none at all for the reference)."""
    if backend == "reference":
        assert not seen, f"the reference backend was asked for, but the graph calls {sorted(seen)}"
        return
    want = {f"{op}_triton" if backend == "triton" else op for op in ops}
    assert want <= seen, f"{backend} was asked for; the graph calls {sorted(seen)}, not all of {sorted(want)}"


# --- errors under fake tensors and torch.compile ----------------------------------------------


def error_text(exc: BaseException) -> str:
    """The messages of an exception and of the exceptions it wraps (torch.compile wraps the user's error)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def eager_error(call) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def assert_same_error(call, expected: BaseException) -> None:
    """``call()`` raises ``expected``'s type with its message; under torch.compile, which wraps the error it
    met while tracing, the wrapper must carry that type and message."""
    with pytest.raises(Exception) as info:
        call()
    got = info.value
    if type(got) is type(expected) and str(got) == str(expected):
        return
    text = error_text(got)
    want = f"{type(expected).__name__}({str(expected)!r})"
    assert want in text or f"{type(expected).__name__}: {expected}" in text, f"expected {want}, got:\n{text[:2000]}"
