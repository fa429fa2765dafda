"""One reading of a mixed op's candidates: what each is, and whether the edge runs fused.

``plan_edge`` reads an edge's candidate modules once, by structure (leaf module
types, shapes and settings, never class names), and returns an ``EdgePlan``: each
candidate's kind, the non-zero candidates, the edge's stride, and, when the fused
edge (``fastnas.ops.darts_edge``) can compute every candidate, its ``EdgeSpec``
with where the parameters and batch-norm buffers live. The same plan serves
fastnas's own ``MixedOp`` (whose modules come from primitive names) and the mixed
ops of other code that ``fastnas.patch`` accelerates.

``EdgePlan.fused_reason(x, ...)`` is the one fuse-or-not policy: None when this
call can run fused, else why not (eval mode, a memory mode without the fused edge,
a dtype the kernels lack (under autocast, autocast's), no fused kernels for the
device, a limit of the kernels). An edge that cannot run fused falls back to its
candidate modules; it never fails. Where the fused edge takes only some of the
candidates, ``EdgePlan.part`` plans those, when they include a convolution;
``fastnas.patch`` runs that part fused and the others (pools without a batch
norm, identity + dropout, full convolutions, ...) as modules beside it.

Candidate kinds (``kind`` strings, as reports show them):

- ``zero``: a stateless leaf that returns zeros; ``identity``: one that returns its
  input (both probed on a small tensor, in train and eval mode);
- ``identity+dropout``: ``Sequential(identity, Dropout, ...)`` (P-DARTS);
- ``max_pool``, ``avg_pool``: ``nn.MaxPool2d`` / ``nn.AvgPool2d``, alone or as the one
  child of a module that returns the pool's output (AutoDL's ``POOLING``, probed); with
  ``+bn`` when followed by an ``nn.BatchNorm2d`` in an ``nn.Sequential``;
- ``factorized_reduce``: one ReLU, two 1x1 stride-2 convolutions of the same input
  and one batch norm over both outputs (AutoDL's also pads the input by one row and
  column at the far end, which changes nothing on the even sizes the fused edge takes);
- convolution chains, leaf modules in order only activations, Conv2d and
  BatchNorm2d, starting with an activation and ending with a batch norm, channels
  agreeing link to link: ``sep_conv_KxK`` (two ReLU, depthwise, 1x1, BN blocks),
  ``dil_conv_KxK`` (one block with a dilated depthwise), ``relu_conv_bn_KxK`` (one
  convolution), ``conv_chain`` (any other); with ``_<activation>`` appended when
  every activation of the chain is the same other one of
  ``fastnas.ops.activations`` (``sep_conv_3x3_relu6``).

Fusable candidates (C channels in and out): zero; identity (stride 1); the
factorized reduce (stride 2, C/2 + C/2 channels); 3x3 padding-1 max and avg pools
(avg without padding in the count) each followed by a batch norm; separable and
dilated (dilation 2) convolutions with odd square kernels, "same" padding, no
bias, the first depthwise carrying the edge's stride. Every batch norm must be
non-affine and share one eps with the others of the edge; either all of them track
running statistics, with one float momentum, or none does (then the fused edge
updates no buffers, as such batch norms do not). Convolutions with a bias and
affine batch norms (AutoDL's ``bias=not affine``) leave the edge to its modules.
A convolution's activation must be one the fused edge's depthwise prologue
computes (``fastnas.ops.darts_edge.FUSED_ACTIVATIONS``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastnas import backends
from fastnas.nn.operations import activation_name
from fastnas.ops._common import autocast_dtype
from fastnas.ops.darts_edge import FUSED_ACTIVATIONS, EdgeSpec, unsupported_reason
from fastnas.ops.darts_edge import MEMORY_MODES as FUSED_MEMORY_MODES

# What a mixed op keeps for backward:
#   save        the fused edge keeps the pre-BN tensors its weighted sum normalises
#   recompute   the fused edge keeps nothing and recomputes inside its backward
#   checkpoint  the candidate modules under torch.utils.checkpoint (a baseline)
#   sum         the candidate modules, only their weighted sum fused
MEMORY_MODES = (*FUSED_MEMORY_MODES, "checkpoint", "sum")


def check_memory(memory: str, where: str = "memory") -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"{where} must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


# --- recognising one candidate ---------------------------------------------------------

_PROBE_SHAPE = (2, 4, 6, 6)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _leaves(m: nn.Module) -> list[nn.Module]:
    return [leaf for leaf in m.modules() if not leaf._modules]


def _is_stateless_leaf(m: nn.Module) -> bool:
    return not m._modules and not m._parameters and not m._buffers


def _probe_input() -> torch.Tensor:
    # No entry is 0 and both signs occur, so ReLU and friends are not taken for zero.
    return torch.arange(torch.Size(_PROBE_SHAPE).numel(), dtype=torch.float32).reshape(_PROBE_SHAPE) % 7 - 3.5


def _outputs(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    """``m.forward(x)`` in training and in eval mode (4-D tensors), or None; ``m`` is left as it was."""
    results = []
    was_training = m.training
    try:
        for mode in (True, False):
            m.training = mode
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                results.append(m.forward(x.clone()))
    except Exception:
        return None
    finally:
        m.training = was_training
    if not all(isinstance(out, torch.Tensor) and out.dim() == 4 for out in results):
        return None
    return results


def _probe(m: nn.Module) -> tuple[str, int] | None:
    """('zero' | 'identity', stride) for a stateless leaf behaving as one, else None."""
    x = _probe_input()
    results = _outputs(m, x)
    if results is None:
        return None
    if all(out.shape == x.shape and torch.equal(out, x) for out in results):
        return "identity", 1
    if all(out.shape[:2] == x.shape[:2] and out.numel() and not out.any() for out in results):
        side = results[0].shape[-1]
        return "zero", (2 if side == (x.shape[-1] + 1) // 2 and side != x.shape[-1] else 1)
    return None


def _chain_kind(leaves: list[nn.Module]) -> str | None:
    """The kind of an activation/Conv2d/BatchNorm2d chain, or None if the leaves are not one."""
    if len(leaves) < 3 or activation_name(leaves[0]) is None or not isinstance(leaves[-1], nn.BatchNorm2d):
        return None
    channels = None
    convs = []
    activations = set()
    for leaf in leaves:
        if activation_name(leaf) is not None:
            activations.add(activation_name(leaf))
            continue
        if isinstance(leaf, nn.Conv2d):
            if channels is not None and leaf.in_channels != channels:
                return None
            if leaf.groups not in (1, leaf.in_channels):
                return None
            channels = leaf.out_channels
            convs.append(leaf)
        elif isinstance(leaf, nn.BatchNorm2d):
            if channels is None or leaf.num_features != channels:
                return None
        else:
            return None
    if not convs:
        return None
    depthwise = [c for c in convs if c.groups == c.in_channels and c.groups > 1]
    size = "x".join(map(str, convs[0].kernel_size))
    if len(activations) > 1:
        return "conv_chain"
    suffix = "" if activations == {"relu"} else f"_{activations.pop()}"
    if depthwise and any(_pair(c.dilation) != (1, 1) for c in depthwise):
        return f"dil_conv_{size}{suffix}"
    if len(depthwise) == 2 and len(convs) == 4:
        return f"sep_conv_{size}{suffix}"
    if len(convs) == 1:
        return f"relu_conv_bn_{size}" if not suffix else f"conv_bn_{size}{suffix}"
    return "conv_chain"


def _wrapped_pool(m: nn.Module) -> nn.Module | None:
    """The pool of a module whose one child is a pool and whose output is the pool's
    (AutoDL's ``POOLING`` when its channels do not change), else None."""
    if isinstance(m, nn.Sequential) or m._parameters or m._buffers or len(m._modules) != 1:
        return None
    pool = next(iter(m._modules.values()))
    if not isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
        return None
    x = _probe_input()
    mine, its = _outputs(m, x), _outputs(pool, x)
    if mine is None or its is None or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, its)):
        return None
    return pool


def _is_reduce_pad(m: nn.Module) -> bool:
    return isinstance(m, nn.ConstantPad2d) and tuple(m.padding) == (0, 1, 0, 1) and m.value == 0


def _is_factorized_reduce(m: nn.Module) -> bool:
    leaves = [leaf for leaf in _leaves(m) if not _is_reduce_pad(leaf)]
    if len(leaves) + 1 < len(_leaves(m)):
        return False
    if Counter(type(c) for c in leaves) != Counter({nn.ReLU: 1, nn.Conv2d: 2, nn.BatchNorm2d: 1}):
        return False
    convs = [c for c in leaves if isinstance(c, nn.Conv2d)]
    bn = next(c for c in leaves if isinstance(c, nn.BatchNorm2d))
    return (
        all(_pair(c.kernel_size) == (1, 1) and _pair(c.stride) == (2, 2) for c in convs)
        and convs[0].in_channels == convs[1].in_channels
        and bn.num_features == convs[0].out_channels + convs[1].out_channels
    )


def candidate_kind(m: nn.Module) -> str | None:
    """The kind of candidate ``m`` is, by structure (see the module docstring), or None."""
    return _recognise(m)[0]


def _recognise(m: nn.Module) -> tuple[str | None, int | None]:
    """(kind, stride read off the module or None)."""
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return ("max_pool" if isinstance(m, nn.MaxPool2d) else "avg_pool"), _pair(m.stride)[0]
    if _is_stateless_leaf(m):
        probed = _probe(m)
        return probed if probed is not None else (None, None)
    pool = _wrapped_pool(m)
    if pool is not None:
        return _recognise(pool)
    if isinstance(m, nn.Sequential) and len(m) >= 2:
        first, rest = m[0], list(m)[1:]
        if isinstance(first, (nn.MaxPool2d, nn.AvgPool2d)) and len(rest) == 1 and isinstance(rest[0], nn.BatchNorm2d):
            kind, stride = _recognise(first)
            return kind + "+bn", stride
        if all(isinstance(r, nn.Dropout) for r in rest) and _is_stateless_leaf(first):
            probed = _probe(first)
            if probed is not None and probed[0] == "identity":
                return "identity+dropout", 1
    if _is_factorized_reduce(m):
        return "factorized_reduce", 2
    kind = _chain_kind(_leaves(m))
    if kind is None:
        return None, None
    first_conv = next(leaf for leaf in m.modules() if isinstance(leaf, nn.Conv2d))
    return kind, _pair(first_conv.stride)[0]


# --- what the fused edge needs of each candidate -------------------------------------------


def _norm_reason(bn: nn.Module, C: int) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d):
        return f"expected a BatchNorm2d, found {type(bn).__name__}"
    if bn.num_features != C:
        return f"a batch norm has {bn.num_features} features, the edge {C} channels"
    if bn.affine:
        return "a batch norm is affine (only non-affine batch norms are folded into the sum)"
    if _tracks(bn) and bn.momentum is None:
        return "a batch norm uses a cumulative average (momentum=None)"
    return None


def _tracks(bn: nn.Module) -> bool:
    return bool(bn.track_running_stats) and bn.running_mean is not None


def _depthwise(conv: nn.Conv2d, C: int, stride: int, dilation: int) -> tuple[int, str | None]:
    k = _pair(conv.kernel_size)
    if (
        conv.in_channels != C
        or conv.out_channels != C
        or conv.groups != C
        or k[0] != k[1]
        or k[0] % 2 == 0
        or _pair(conv.stride) != (stride, stride)
        or _pair(conv.dilation) != (dilation, dilation)
        or _pair(conv.padding) != (dilation * (k[0] - 1) // 2,) * 2
        or conv.bias is not None
        or conv.padding_mode != "zeros"
    ):
        return 0, f"a depthwise convolution is not a fusable {C}-channel kxk (stride {stride}, dilation {dilation})"
    return k[0], None


def _pointwise_reason(conv: nn.Module, C_in: int, C_out: int, stride: int = 1) -> str | None:
    if (
        not isinstance(conv, nn.Conv2d)
        or conv.in_channels != C_in
        or conv.out_channels != C_out
        or conv.groups != 1
        or _pair(conv.kernel_size) != (1, 1)
        or _pair(conv.stride) != (stride, stride)
        or _pair(conv.padding) != (0, 0)
        or conv.bias is not None
    ):
        return "a 1x1 convolution does not map the edge's channels without bias"
    return None


@dataclass(frozen=True)
class _Fused:
    """What the fused edge takes of one candidate: its role and its tensors' places."""

    role: str  # "sep", "dil", "max", "avg", "identity", "reduce", "zero"
    k: int = 0
    params: tuple = ()  # module paths (relative to the candidate) of the weights, in EdgeSpec order
    norms: tuple = ()  # module paths of the batch norms, in the order the spec's rows need them
    activation: str = "relu"  # of a sep or dil


def _conv_for_fusion(m: nn.Module, kind: str, C: int, stride: int) -> _Fused | str:
    named = [(name, leaf) for name, leaf in m.named_modules() if not leaf._modules]
    leaves = [leaf for _, leaf in named]
    names = [name for name, _ in named]
    acts = [activation_name(leaf) for leaf in leaves]
    kinds = ["act" if a is not None else type(leaf) for a, leaf in zip(acts, leaves)]
    block = ["act", nn.Conv2d, nn.Conv2d, nn.BatchNorm2d]
    activation = acts[0]
    if activation is not None and activation not in FUSED_ACTIVATIONS:
        return (
            f"its {activation} activation (the fused edge's depthwise prologue computes {', '.join(FUSED_ACTIVATIONS)})"
        )
    if kind.startswith("sep_conv_") and kinds == block * 2:
        k1, why = _depthwise(leaves[1], C, stride, 1)
        k2, why2 = _depthwise(leaves[5], C, 1, 1)
        why = why or why2 or _pointwise_reason(leaves[2], C, C) or _pointwise_reason(leaves[6], C, C)
        why = why or _norm_reason(leaves[3], C) or _norm_reason(leaves[7], C)
        if why is None and k1 != k2:
            why = "the two depthwise convolutions of a separable convolution differ in size"
        if why is None and acts[4] != activation:
            why = "the two activations of a separable convolution differ"
        if why:
            return why
        return _Fused("sep", k1, (names[1], names[2], names[5], names[6]), (names[3], names[7]), activation)
    if kind.startswith("dil_conv_") and kinds == block:
        k, why = _depthwise(leaves[1], C, stride, 2)
        why = why or _pointwise_reason(leaves[2], C, C) or _norm_reason(leaves[3], C)
        if why:
            return why
        return _Fused("dil", k, (names[1], names[2]), (names[3],), activation)
    return "a convolution candidate that is neither a separable nor a dilated (dilation 2) convolution"


def _pool_for_fusion(m: nn.Module, kind: str, C: int, stride: int) -> _Fused | str:
    if not kind.endswith("+bn"):
        return "a pooling candidate without a following batch norm"
    pool, bn = m[0], m[1]
    why = _norm_reason(bn, C)
    if why:
        return why
    common = (
        _pair(pool.kernel_size) == (3, 3)
        and _pair(pool.stride) == (stride, stride)
        and _pair(pool.padding) == (1, 1)
        and not pool.ceil_mode
    )
    if isinstance(pool, nn.MaxPool2d) and common and _pair(pool.dilation) == (1, 1) and not pool.return_indices:
        return _Fused("max", norms=("1",))
    if isinstance(pool, nn.AvgPool2d) and common and not pool.count_include_pad and pool.divisor_override is None:
        return _Fused("avg", norms=("1",))
    return "a pooling candidate that is not a 3x3, padding 1 max pool or avg pool (count_include_pad=False)"


def _reduce_for_fusion(m: nn.Module, C: int) -> _Fused | str:
    named = {name: leaf for name, leaf in m.named_modules() if not leaf._modules}
    convs = [name for name, c in named.items() if isinstance(c, nn.Conv2d)]
    norm = next(name for name, c in named.items() if isinstance(c, nn.BatchNorm2d))
    half = C // 2
    why = _pointwise_reason(named[convs[0]], C, half, 2) or _pointwise_reason(named[convs[1]], C, C - half, 2)
    why = why or _norm_reason(named[norm], C)
    if why:
        return why
    return _Fused("reduce", params=(convs[0], convs[1]), norms=(norm,))


def _for_fusion(m: nn.Module, kind: str | None, C: int, stride: int) -> _Fused | str | None:
    """How the fused edge computes candidate ``m``, why it cannot, or None when it is
    not a kind of candidate the fused edge computes at all."""
    if kind == "zero":
        return _Fused("zero")
    if kind == "identity":
        return _Fused("identity") if stride == 1 else "an identity candidate on a stride-2 edge"
    if kind is not None and kind.startswith(("max_pool", "avg_pool")):
        return _pool_for_fusion(m, kind, C, stride)
    if kind == "factorized_reduce":
        return _reduce_for_fusion(m, C) if stride == 2 else "a factorized reduce on a stride-1 edge"
    if kind is not None and kind.startswith(("sep_conv_", "dil_conv_")):
        return _conv_for_fusion(m, kind, C, stride)
    return None


def _channels(candidates) -> int | None:
    """The edge's channel count, read off the first candidate that has one."""
    for m in candidates:
        for leaf in m.modules():
            if isinstance(leaf, nn.Conv2d):
                return leaf.in_channels
            if isinstance(leaf, nn.BatchNorm2d):
                return leaf.num_features
    return None


# --- the plan of one edge --------------------------------------------------------------------


@dataclass(frozen=True)
class EdgePlan:
    """An edge's candidates as read once. Plain data: the tensors are looked up in the
    live candidate list at each call (``BoundEdge``), so that copies, pickles and
    replicas of a module use their own.

    ``kinds``: each candidate's kind (None: not recognised); ``active``: the indices
    of the non-zero candidates; ``stride``: the edge's stride (None when no
    candidate tells); ``spec``: the fused edge's ``EdgeSpec``, or None with
    ``reason`` saying why the fused edge cannot compute these candidates;
    ``channels``: the edge's input channels (None when no candidate tells).
    ``part``: where ``spec`` is None, the plan of the candidates ``part_index`` that
    the fused edge computes, when they include a convolution (bind it to those
    candidates alone), or None; ``rest`` the other non-zero candidates.
    """

    kinds: tuple
    active: tuple[int, ...]
    stride: int | None
    spec: EdgeSpec | None = None
    reason: str | None = None
    params: tuple = ()  # (candidate index, module path, attribute) per parameter, in EdgeSpec's order
    norms: tuple = ()  # (candidate index, module path) per batch norm, in EdgeSpec's buffer order
    channels: int | None = None  # the edge's input channels, when the candidates tell
    track: bool = True  # whether the batch norms keep running statistics (all of them or none)
    # When the fused edge cannot take every candidate: the plan of the candidates
    # ``part_index`` it does take (its spec's weight indices count within the part).
    part: EdgePlan | None = None
    part_index: tuple[int, ...] = ()

    @property
    def rest(self) -> tuple[int, ...]:
        """The non-zero candidates outside ``part``, which run as modules beside it."""
        return tuple(i for i in self.active if i not in self.part_index)

    def bind(self, candidates) -> BoundEdge:
        return BoundEdge(self, candidates)

    def restrict(self, keep) -> EdgePlan:
        """The plan of the same edge with only the candidates ``keep`` (indices) computed.

        The fused spec keeps the edge's weight indices (``K`` is unchanged), so the
        same weight vector drives it; the other candidates cost nothing. Read off this
        plan, never off the modules again, so a sampled path is planned once.
        """
        keep = frozenset(keep)
        active = tuple(i for i in self.active if i in keep)
        if self.spec is None:
            return EdgePlan(self.kinds, active, self.stride, reason=self.reason, channels=self.channels)
        spec = self.spec
        # Each kept convolution keeps its activation (seps, then dils, as the spec lists them).
        convs = spec.sep + spec.dil
        activations = tuple(a for (_, i), a in zip(convs, spec.activations) if i in keep)

        def kept(i):
            return i if i is not None and i in keep else None

        sub = dataclasses.replace(
            spec,
            sep=tuple(s for s in spec.sep if s[1] in keep),
            dil=tuple(d for d in spec.dil if d[1] in keep),
            max_index=kept(spec.max_index),
            avg_index=kept(spec.avg_index),
            skip_index=kept(spec.skip_index),
            reduce_index=kept(spec.reduce_index),
            activations=() if set(activations) <= {"relu"} else activations,
        )
        if sub.ns + sub.nd == 0 and sub.reduce_index is None and sub.max_index is None and sub.avg_index is None:
            return EdgePlan(
                self.kinds,
                active,
                self.stride,
                reason="only an identity or zeros: nothing to fuse",
                channels=self.channels,
            )
        params = tuple(p for p in self.params if p[0] in keep)
        norms = tuple(n for n in self.norms if n[0] in keep)
        return EdgePlan(
            self.kinds,
            active,
            self.stride,
            spec=sub,
            params=params,
            norms=norms,
            channels=self.channels,
            track=self.track,
        )

    def fused_reason(self, x: torch.Tensor, backend: str | None, *, training: bool, memory: str = "save") -> str | None:
        """None when this call of the edge can run the fused edge, else why not."""
        if self.spec is None:
            return self.reason
        if memory not in FUSED_MEMORY_MODES:
            return f"memory={memory!r} runs the candidate modules"
        if not training:
            return "eval mode or one sampled candidate (the fused edge computes the whole training-mode edge)"
        if x.dim() != 4:
            return f"a {x.dim()}-D input"
        name = backends.resolve("darts_edge", x.device, backend)
        if name == "reference":
            return f"no fused kernels serve {x.device.type} tensors here"
        # Under autocast the edge runs in autocast's dtype, as its convolutions would.
        why = unsupported_reason(self.spec, autocast_dtype(x) or x.dtype, name)
        if why is None and self.spec.reduce_index is not None and (x.shape[2] % 2 or x.shape[3] % 2):
            why = f"a factorized reduce needs an even height and width, got {tuple(x.shape[2:])}"
        return why


class BoundEdge:
    """An ``EdgePlan`` bound to a candidate list: the current parameters and buffers."""

    __slots__ = ("candidates", "plan", "_norms", "_params")

    def __init__(self, plan: EdgePlan, candidates):
        self.plan = plan
        self.candidates = candidates
        self._params = [(candidates[i].get_submodule(path), attr) for i, path, attr in plan.params]
        self._norms = [candidates[i].get_submodule(path) for i, path in plan.norms]

    def parameters(self) -> list[torch.Tensor]:
        # Read at each call: torch.func.functional_call swaps them in place for a call.
        return [getattr(m, attr) for m, attr in self._params]

    def buffers(self):
        """(running means, running variances, batch counts) for ``darts_edge``; None when
        the edge's batch norms keep no running statistics."""
        if not self.plan.track:
            return None
        return (
            [m.running_mean for m in self._norms],
            [m.running_var for m in self._norms],
            [m.num_batches_tracked for m in self._norms],
        )


def plan_edge(candidates, C: int | None = None, stride: int | None = None, partial: bool = False) -> EdgePlan:
    """Read an edge's candidate modules once; ``C`` and ``stride`` are read off the
    modules when not given. Never raises for candidates it does not know: their
    kind is None and the plan says why the edge cannot be fused, or, with
    ``partial``, the fused edge computes the others and the plan lists these in
    ``modules``."""
    candidates = list(candidates)
    read = [_recognise(m) for m in candidates]
    kinds = tuple(kind for kind, _ in read)
    active = tuple(i for i, kind in enumerate(kinds) if kind != "zero")
    if stride is None:
        strides = {s for kind, s in read if s is not None and kind != "zero"} or {s for _, s in read if s is not None}
        stride = strides.pop() if len(strides) == 1 else None
    if C is None:
        C = _channels(candidates)
    plan = EdgePlan(kinds=kinds, active=active, stride=stride, channels=C)
    if None in kinds:
        i = kinds.index(None)
        return _without_fusion(plan, _not_computed(i, candidates[i]))
    if stride not in (1, 2):
        return _without_fusion(plan, "the edge's stride cannot be read off its candidates")
    if C is None:
        return _without_fusion(plan, "the edge's channel count cannot be read off its candidates")
    read_for_fusion = []
    reason = None
    for i, (m, kind) in enumerate(zip(candidates, kinds)):
        got = _for_fusion(m, kind, C, stride)
        if got is None:
            got = _not_computed(i, m)
        elif isinstance(got, str):
            got = f"candidate {i} ({type(m).__name__}): {got}"
        if isinstance(got, str) and reason is None:
            reason = got
        read_for_fusion.append(got)
    if reason is None:
        return _with_fusion(plan, candidates, read_for_fusion)
    return _with_part(_without_fusion(plan, reason), candidates, read_for_fusion)


def _with_part(plan: EdgePlan, candidates, read_for_fusion: list) -> EdgePlan:
    """``plan`` with the part of its edge the fused edge computes, when that part
    holds a convolution candidate (what the fused edge saves most on); the other
    candidates then run as modules beside it."""
    part = tuple(i for i, got in enumerate(read_for_fusion) if isinstance(got, _Fused))
    if not any(read_for_fusion[i].role in ("sep", "dil") for i in part):
        return plan
    sub = EdgePlan(
        kinds=tuple(plan.kinds[i] for i in part),
        active=tuple(j for j, i in enumerate(part) if plan.kinds[i] != "zero"),
        stride=plan.stride,
        channels=plan.channels,
    )
    sub = _with_fusion(sub, [candidates[i] for i in part], [read_for_fusion[i] for i in part])
    if sub.spec is None:
        return plan
    return dataclasses.replace(plan, part=sub, part_index=part)


def _not_computed(i: int, m: nn.Module) -> str:
    return f"candidate {i} ({type(m).__name__}) is not one the fused edge computes"


def _without_fusion(plan: EdgePlan, reason: str) -> EdgePlan:
    return EdgePlan(plan.kinds, plan.active, plan.stride, reason=reason, channels=plan.channels)


def _with_fusion(plan: EdgePlan, candidates, fused: list[_Fused]) -> EdgePlan:
    roles = Counter(f.role for f in fused)
    for role in ("identity", "reduce", "max", "avg"):
        if roles[role] > 1:
            return _without_fusion(plan, f"two {role} candidates")
    if len(fused) == roles["zero"]:
        return _without_fusion(plan, "no candidate other than zero")
    index = {f.role: i for i, f in enumerate(fused) if f.role in ("identity", "reduce", "max", "avg")}
    sep = [(i, f) for i, f in enumerate(fused) if f.role == "sep"]
    dil = [(i, f) for i, f in enumerate(fused) if f.role == "dil"]
    # EdgeSpec's parameter order: each sep (dw1, pw1, dw2, pw2), each dil (dw, pw), the reduce's two.
    params = [(i, path, "weight") for i, f in sep + dil for path in f.params]
    if "reduce" in index:
        params += [(index["reduce"], path, "weight") for path in fused[index["reduce"]].params]
    # EdgeSpec's buffer order: sep middles, dils, sep ends, reduce, max pool, avg pool.
    norms = [(i, f.norms[0]) for i, f in sep] + [(i, f.norms[0]) for i, f in dil] + [(i, f.norms[1]) for i, f in sep]
    norms += [(index[role], fused[index[role]].norms[0]) for role in ("reduce", "max", "avg") if role in index]
    bns = [candidates[i].get_submodule(path) for i, path in norms]
    tracking = {_tracks(bn) for bn in bns}
    if len(tracking) > 1:
        return _without_fusion(plan, "some batch norms of the edge keep running statistics and others do not")
    track = tracking.pop() if tracking else True
    eps = {bn.eps for bn in bns}
    momentum = {float(bn.momentum) for bn in bns} if track else set()
    if len(eps) > 1 or len(momentum) > 1:
        return _without_fusion(plan, "the batch norms of the edge differ in eps or momentum")
    activations = tuple(f.activation for _, f in sep + dil)
    spec = EdgeSpec(
        stride=plan.stride,
        K=len(fused),
        sep=tuple((f.k, i) for i, f in sep),
        dil=tuple((f.k, i) for i, f in dil),
        activations=() if set(activations) <= {"relu"} else activations,
        max_index=index.get("max"),
        avg_index=index.get("avg"),
        skip_index=index.get("identity"),
        reduce_index=index.get("reduce"),
        eps=eps.pop() if eps else 1e-5,
        momentum=momentum.pop() if momentum else 0.1,
    )
    return EdgePlan(
        plan.kinds, plan.active, plan.stride, spec=spec, params=tuple(params), norms=tuple(norms),
        channels=plan.channels, track=track,
    )  # fmt: skip
