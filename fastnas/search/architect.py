"""Architecture gradients: first order, and DARTS' unrolled second order.

Both return the gradient of the validation loss with respect to the
architecture parameters without touching the weights' ``.grad``. The second
order follows Liu et al. (2019), eq. 7-8: a virtual SGD step
``w' = w - xi * (grad + momentum * buffer + wd * w)`` and the Hessian-vector
product by central differences with ``eps = 0.01 / ||dL_val/dw'||``. The
network is evaluated at other weights with ``torch.func.functional_call``, so
no copy of the model is made.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fastnas.search.distributed import DistributedContext

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
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """dL_val/dalpha at the current weights; returns (grads, loss, logits).

    ``scale`` (a GradScaler's ``scale``) multiplies the loss before
    differentiation; the grads are then scaled too.
    """
    with autocast():
        logits = net(x_val)
        loss = F.cross_entropy(logits, y_val)
    # autograd.grad computes only what alpha needs, not the weights' gradients.
    target = scale(loss) if scale is not None else loss
    grads = torch.autograd.grad(target, arch_params, allow_unused=True)
    return _grads_or_zeros(grads, arch_params), loss.detach(), logits.detach()


class UnrolledArchGrad:
    """Second-order DARTS architecture gradient for ``net``.

    ``fd_radius`` is the length of the finite-difference step in weight space
    (DARTS: 0.01, so ``eps = 0.01 / ||v||``).
    """

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
        # The extra forward passes run on copies of the batch-norm statistics,
        # so the real running statistics see exactly one update per step.
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
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vector))
        eps = self.fd_radius / norm.clamp_min(1e-12)
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                shifted = [w + sign * eps * v for w, v in zip(self.weights, vector)]
            loss, _ = self._loss(shifted, self.arch, buffers, x, y, autocast)
            grads.append(_grads_or_zeros(torch.autograd.grad(loss, self.arch, allow_unused=True), self.arch))
        return [(gp - gm) / (2 * eps) for gp, gm in zip(*grads)]
