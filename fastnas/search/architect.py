"""Architecture gradients: first order, DARTS' unrolled second order, and Amended-DARTS.

Each returns the gradient of the validation loss with respect to the
architecture parameters without touching the weights' ``.grad``. The second
order follows Liu et al. (2019), eq. 7-8: a virtual SGD step
``w' = w - xi * (grad + momentum * buffer + wd * w)`` and the Hessian-vector
product by central differences with ``eps = 0.01 / ||dL_val/dw'||``. The
amended gradient follows Bi et al. (2019): at the current weights,
``dL_val/dalpha - eta * (d2 L_train / dalpha dw) . H . dL_val/dw`` with ``H``
the Hessian of the training loss in the weights, both products by central
differences of first-order gradients. The network is evaluated at other
weights with ``torch.func.functional_call``, so no copy of the model is made,
and on copies of the batch-norm statistics, so the real running statistics see
exactly one update per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fastnas.run.distributed import DistributedContext

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grads_or_zeros(grads, like):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def first_order_arch_grads(
    net: nn.Module,
    arch_params: list[torch.Tensor],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    autocast,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """dL_val/dalpha at the current weights; returns (grads, loss, logits).

    ``scale`` (a GradScaler's ``scale``) multiplies the loss before
    differentiation; the grads are then scaled too. ``penalty()``, a term of the
    architecture parameters alone, is added to the loss that is differentiated
    (outside autocast); the returned loss is the validation loss alone.
    """
    with autocast():
        logits = net(x_val)
        loss = F.cross_entropy(logits, y_val)
    # autograd.grad computes only what alpha needs, not the weights' gradients.
    target = loss if penalty is None else loss + penalty()
    target = scale(target) if scale is not None else target
    grads = torch.autograd.grad(target, arch_params, allow_unused=True)
    return _grads_or_zeros(grads, arch_params), loss.detach(), logits.detach()


class _FunctionalNetwork:
    """``net`` evaluated at given weights and architecture parameters, and the central
    differences of its gradients along a direction in weight space."""

    def __init__(self, net: nn.Module, dist_ctx: DistributedContext | None = None, fd_radius: float = 0.01):
        self.net = net
        self.fd_radius = fd_radius
        self.dist = dist_ctx or DistributedContext()
        arch_ids = {id(p) for p in net.arch_parameters()}
        named = list(net.named_parameters())
        self.arch_names = [n for n, p in named if id(p) in arch_ids]
        self.weight_names = [n for n, p in named if id(p) not in arch_ids]
        self.weights = [p for n, p in named if id(p) not in arch_ids]
        self.arch = [p for n, p in named if id(p) in arch_ids]

    def _loss(self, weights, arch, buffers, x, y, autocast):
        params = dict(zip(self.weight_names, weights))
        params.update(zip(self.arch_names, arch))
        with autocast():
            logits = functional_call(self.net, (params, buffers), (x,))
            return F.cross_entropy(logits, y), logits

    def _central_difference(self, vector, buffers, x, y, autocast, wrt: str):
        """``(grad(w + eps v) - grad(w - eps v)) / (2 eps)`` of the loss on (x, y), with
        ``eps = fd_radius / ||v||``: the gradient with respect to the architecture
        (``wrt="arch"``: ``d2 L / dalpha dw . v``) or to the weights (``"weights"``: ``H . v``)."""
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vector))
        eps = self.fd_radius / norm.clamp_min(1e-12)
        arch_const = [a.detach() for a in self.arch]
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                shifted = [w + sign * eps * v for w, v in zip(self.weights, vector)]
            if wrt == "arch":
                loss, _ = self._loss(shifted, self.arch, buffers, x, y, autocast)
                targets = self.arch
            else:
                shifted = [w.requires_grad_() for w in shifted]
                loss, _ = self._loss(shifted, arch_const, buffers, x, y, autocast)
                targets = shifted
            grads.append(_grads_or_zeros(torch.autograd.grad(loss, targets, allow_unused=True), targets))
        return [(gp - gm) / (2 * eps) for gp, gm in zip(*grads)]


class UnrolledArchGrad(_FunctionalNetwork):
    """Second-order DARTS architecture gradient for ``net``.

    ``fd_radius`` is the length of the finite-difference step in weight space
    (DARTS: 0.01, so ``eps = 0.01 / ||v||``).
    """

    def __call__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        lr: float,
        momentum: float,
        weight_decay: float,
        optimizer: torch.optim.Optimizer,
        autocast,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Returns (arch grads, validation loss, validation logits)."""
        buffers = {n: b.clone() for n, b in self.net.named_buffers()}
        arch_const = [a.detach() for a in self.arch]

        loss, _ = self._loss(self.weights, arch_const, buffers, x_train, y_train, autocast)
        grad_w = _grads_or_zeros(torch.autograd.grad(loss, self.weights, allow_unused=True), self.weights)
        # A virtual step of the averaged gradient, as the real step will take.
        self.dist.all_reduce_mean_(grad_w)

        with torch.no_grad():
            unrolled = []
            for w, g in zip(self.weights, grad_w):
                buf = optimizer.state.get(w, {}).get("momentum_buffer")
                step = g + weight_decay * w
                if buf is not None:
                    step = step + momentum * buf
                unrolled.append((w - lr * step).requires_grad_())

        val_loss, val_logits = self._loss(unrolled, self.arch, buffers, x_val, y_val, autocast)
        grads = torch.autograd.grad(val_loss, self.arch + unrolled, allow_unused=True)
        grads = _grads_or_zeros(grads, self.arch + unrolled)
        grad_alpha, grad_unrolled = grads[: len(self.arch)], grads[len(self.arch) :]
        self.dist.all_reduce_mean_(grad_unrolled)

        implicit = self._hessian_vector_product(grad_unrolled, buffers, x_train, y_train, autocast)
        arch_grads = [ga - lr * h for ga, h in zip(grad_alpha, implicit)]
        return arch_grads, val_loss.detach(), val_logits.detach()

    def _hessian_vector_product(self, vector, buffers, x, y, autocast):
        """(d^2 L_train / dalpha dw) . vector by central differences."""
        return self._central_difference(vector, buffers, x, y, autocast, "arch")


class AmendedArchGrad(_FunctionalNetwork):
    """The amended architecture gradient of Amended-DARTS (Bi et al., 2019) for ``net``.

    At the current weights ``w`` (taken as close to optimal for the current
    architecture): ``g = dL_val/dalpha - eta * (d2 L_train / dalpha dw) . H . dL_val/dw``,
    ``H = d2 L_train / dw2``. Replacing DARTS' ``H^-1`` (the implicit-function
    gradient) by ``eta * H`` keeps the angle between the amending term and the
    true one below 90 degrees, so the error of the estimate stays bounded.
    ``H . v`` and ``(d2 L_train / dalpha dw) . u`` are central differences of
    first-order gradients, each with radius ``fd_radius`` in weight space.
    Same call and return as ``UnrolledArchGrad``; ``lr``, ``momentum``,
    ``weight_decay`` and ``optimizer`` are not used.
    """

    def __init__(
        self,
        net: nn.Module,
        eta: float,
        dist_ctx: DistributedContext | None = None,
        fd_radius: float = 0.01,
    ):
        super().__init__(net, dist_ctx, fd_radius)
        self.eta = float(eta)

    def __call__(self, x_train, y_train, x_val, y_val, lr=None, momentum=None, weight_decay=None, optimizer=None,
                 autocast=None):  # fmt: skip
        """Returns (arch grads, validation loss, validation logits)."""
        autocast = autocast or _no_autocast
        buffers = {n: b.clone() for n, b in self.net.named_buffers()}
        val_loss, val_logits = self._loss(self.weights, self.arch, buffers, x_val, y_val, autocast)
        grads = _grads_or_zeros(torch.autograd.grad(val_loss, self.arch + self.weights, allow_unused=True),
                                self.arch + self.weights)  # fmt: skip
        grad_alpha, grad_w = grads[: len(self.arch)], grads[len(self.arch) :]
        # Every rank moves its weights along the same directions.
        self.dist.all_reduce_mean_(grad_w)
        amending = self.amending_term(grad_w, buffers, x_train, y_train, autocast)
        arch_grads = [ga - self.eta * t for ga, t in zip(grad_alpha, amending)]
        return arch_grads, val_loss.detach(), val_logits.detach()

    def amending_term(self, grad_w, buffers, x, y, autocast) -> list[torch.Tensor]:
        """``(d2 L_train / dalpha dw) . H . grad_w`` on the training batch (x, y)."""
        hv = self._central_difference(grad_w, buffers, x, y, autocast, "weights")
        self.dist.all_reduce_mean_(hv)
        return self._central_difference(hv, buffers, x, y, autocast, "arch")


def _no_autocast():
    return contextlib.nullcontext()
