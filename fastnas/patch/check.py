"""The check at patch time: a method is replaced only when, on a float64 probe, it
computes what its replacement does (outputs, gradients, batch-norm buffers)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random

import torch
import torch.nn as nn

from fastnas.patch.recognise import Found, Plan, signature
from fastnas.patch.replace import replacement, unbind
from fastnas.patch.report import DESCRIBE, GDAS_SUM, NB201_CELL, NONZERO_SUM, ONE, PC_DARTS, SUM

_PROBE_SIZE = 8
_PROBE_TOL = dict(rtol=1e-6, atol=1e-9)


@contextlib.contextmanager
def _random_state_kept():
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(state)


def _twin(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    unbind(twin)
    return twin.to(device="cpu", dtype=torch.float64)


def _probe_args(module: nn.Module, plan: Plan, what: str, gen: torch.Generator, zeros: bool):
    n = plan.n
    if plan.style == NB201_CELL:
        C = plan.edges[0].plan.channels
        weights_shape = (len(plan.edges), n)
    else:
        C = plan.edge.channels
        if C is not None and plan.style == PC_DARTS:
            C *= plan.groups
        weights_shape = (n,)
    if C is None:
        raise ValueError("the channels cannot be read off the candidates")
    x = torch.randn(2, C, _PROBE_SIZE, _PROBE_SIZE, generator=gen, dtype=torch.float64).requires_grad_(True)
    weights = torch.randn(weights_shape, generator=gen, dtype=torch.float64).softmax(-1)
    if zeros:
        # Every other non-zero candidate weighted exactly 0: code that skips such
        # candidates computes their weights' gradient and batch norms differently.
        weights[..., list(plan.edges[0].plan.active[1::2])] = 0
    weights.requires_grad_(True)
    args = [x, weights]
    if what in (GDAS_SUM, ONE):
        if plan.style == NB201_CELL:
            args.append(torch.randint(0, n, (len(plan.edges), 1), generator=gen))
        else:
            args.append(int(torch.randint(0, n, (1,), generator=gen)))
    return args, [x, weights]


def _probe_run(twin: nn.Module, fn, plan: Plan, what: str) -> dict:
    """Outputs, gradients and buffers of ``fn(twin, *probe)`` in training then eval mode,
    and for a weighted sum once more in training with some weights exactly 0."""
    gen = torch.Generator().manual_seed(0)
    grad_gen = torch.Generator().manual_seed(1)
    params = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    seen = {}
    with _random_state_kept():
        runs = [("training", True, False), ("eval", False, False)]
        if what in (SUM, NONZERO_SUM):
            runs.append(("training, zero weights", True, True))
        for mode, training, zeros in runs:
            twin.train(training)
            args, leaves = _probe_args(twin, plan, what, gen, zeros)
            torch.manual_seed(2)
            out = fn(twin, *args)
            if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
                raise TypeError(f"returned {type(out).__name__}, not a floating-point tensor")
            g = torch.randn(out.shape, generator=grad_gen, dtype=out.dtype)
            grads = torch.autograd.grad(out, leaves + [p for _, p in params], g, allow_unused=True)
            seen[f"output ({mode})"] = out.detach()
            seen[f"input gradient ({mode})"] = grads[0]
            seen[f"weights gradient ({mode})"] = grads[1]
            for (name, _), gp in zip(params, grads[2:]):
                seen[f"gradient of {name} ({mode})"] = gp
    for name, b in twin.named_buffers():
        seen[f"buffer {name}"] = b.detach().clone()
    return seen


def _difference(a: dict, b: dict) -> str | None:
    for name, u in a.items():
        v = b.get(name)
        if (u is None) != (v is None):
            return f"{name} is {'missing' if v is None else 'present where the original has none'}"
        if u is None:
            continue
        if u.shape != v.shape:
            return f"{name} has shape {tuple(v.shape)}, the original's {tuple(u.shape)}"
        if u.is_floating_point() and not torch.allclose(v, u, **_PROBE_TOL, equal_nan=True):
            return f"{name} differs by {(v - u).abs().nan_to_num(float('inf')).max().item():.3g}"
        if not u.is_floating_point() and not torch.equal(u, v):
            return f"{name} differs"
    return None


def check_method(module: nn.Module, plan: Plan, name: str, what: str) -> str | None:
    """None when method ``name`` computes what the replacement ``what`` computes on a
    float64 probe (outputs, gradients, buffers), else why it was not replaced."""
    # Whatever the caller's context (no_grad, inference mode, autocast), the probe needs gradients.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return _check_on_copies(module, plan, name, what)


def _check_on_copies(module: nn.Module, plan: Plan, name: str, what: str) -> str | None:
    sig = signature(type(module), name)
    try:
        twins = (_twin(module), _twin(module))
    except Exception as err:
        return f"{name}{sig} was not replaced: no float64 copy of the module to check it on ({type(err).__name__})"
    probe = dataclasses.replace(plan, backend=None, methods=((name, what),))
    original = getattr(type(module), name)

    def replaced(m, *args):
        out = replacement(m, probe, what, args)
        if out is None:
            raise RuntimeError("the replacement did not take the probe call")
        return out

    runs = []
    for twin, fn, who in ((twins[0], original, "it"), (twins[1], replaced, "its replacement")):
        try:
            runs.append(_probe_run(twin, fn, probe, what))
        except Exception as err:
            return f"{name}{sig}: on a probe call {who} raised {type(err).__name__}: {str(err)[:120]}"
    diff = _difference(*runs)
    if diff is not None:
        return f"{name}{sig} does not compute {DESCRIBE[what]}: on a float64 probe its {diff}"
    return None


def check_key(module: nn.Module, found: Found, name: str, what: str):
    edges = tuple((e.key, e.plan.kinds, e.plan.stride, e.plan.spec is not None) for e in found.edges)
    return (type(module), name, what, found.style, found.groups, edges)
