"""What a search method is: its defaults, its stages and schedules, its step, what it supports.

``SearchMethod`` holds what DARTS-family methods share (a supernet with softmaxed
architecture weights, a bilevel step: an architecture step on a validation batch,
then a weight step on a training batch, one stage). Each method overrides only
where it differs, in a file of its own, registered by one line in
``fastnas.search.methods``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

from fastnas.errors import SearchError

if TYPE_CHECKING:
    from fastnas.search.config import SearchConfig


class SearchMethod:
    """A search method; subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str] = ""
    #: One line for ``fastnas search --help``.
    summary: ClassVar[str] = ""
    #: SearchConfig values from the method's paper (CIFAR settings).
    defaults: ClassVar[dict] = {}
    #: Epochs on the bundled digits, where a run takes minutes.
    digits_epochs: ClassVar[int] = 3
    #: The epochs the paper's warm-up is meant for: a shorter run scales its warm-up.
    paper_epochs: ClassVar[int | None] = None
    #: Search spaces the method searches.
    spaces: ClassVar[tuple[str, ...]] = ("darts", "nb201")
    #: DDP must look for parameters that get no gradient in a step (one path per step).
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: Why a step of this method cannot be captured as a CUDA graph, or None when it can.
    cuda_graph_unsupported: ClassVar[str | None] = None
    #: The method searches an activation factor (``config.activations``, Scalable-DARTS).
    searches_activations: ClassVar[bool] = False
    #: The method learns architecture weights and ends with a genotype; False: it trains a
    #: supernet for ``fastnas select`` (single-path and one-shot methods).
    trains_architecture: ClassVar[bool] = True
    #: Each step also takes a batch of the validation half (the architecture's step).
    uses_validation_batches: ClassVar[bool] = True
    #: Samples architectures under a ``--constraint`` on parameters or FLOPs.
    supports_constraint: ClassVar[bool] = False
    #: Each step updates the weights first, then the architecture (GDAS' loop); False:
    #: the architecture first, as DARTS.
    weights_first: ClassVar[bool] = False
    #: SearchConfig fields that only this method reads (e.g. ``amend_coefficient``): any other
    #: method refuses them when they differ from their defaults.
    own_options: ClassVar[tuple[str, ...]] = ()

    # --- settings -------------------------------------------------------------------

    def configure(self, values: dict, given: dict) -> None:
        """Fill method-specific settings derived from others (``values``) unless the
        user ``given`` them. Called by ``SearchConfig.create``."""

    def scaled_warmup(self, values: dict) -> int:
        """The paper's warm-up scaled to the epochs of this run (``paper_epochs`` set)."""
        return int(round(values["epochs"] * values["warmup_epochs"] / self.paper_epochs))

    def validate(self, config: SearchConfig) -> None:
        """Raise SearchError for settings this method cannot run."""
        if config.space not in self.spaces:
            from fastnas.spaces import get_space

            names = " and ".join(get_space(s).title for s in self.spaces)
            raise SearchError(f"{self.name} searches the {names} space only; use --space {self.spaces[0]}")
        if config.activations is not None and not self.searches_activations:
            raise SearchError(f"{self.name} does not search activations; --activations is for scalable-darts")
        if config.constraint and not self.supports_constraint:
            raise SearchError(f"{self.name} samples no architectures under a constraint; --constraint is for spos")
        if config.arch_grad_clip is not None:
            if not self.trains_architecture:
                raise SearchError(f"{self.name} trains no architecture parameters; drop --arch-grad-clip")
            if not config.arch_grad_clip > 0:
                raise SearchError(f"--arch-grad-clip must be positive, got {config.arch_grad_clip}")
        if config.label_smoothing and self.trains_architecture:
            raise SearchError(f"--label-smoothing is for single-path and one-shot methods, not {self.name}")
        if config.path_dropout and self.trains_architecture:
            raise SearchError(f"--path-dropout is for single-path and one-shot methods, not {self.name}")
        self._refuse_others_options(config)

    def _refuse_others_options(self, config: SearchConfig) -> None:
        import dataclasses

        from fastnas.search.methods import REGISTRY

        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for method in REGISTRY.values():
            for field in method.own_options:
                if field not in self.own_options and getattr(config, field) != defaults[field]:
                    option = "--" + field.replace("_", "-")
                    raise SearchError(f"{option} is for {method.name}, not {self.name}")

    def stages(self, config: SearchConfig) -> list[dict]:
        """The training stages: layers, epochs, warm-up epochs and skip dropout of each."""
        return [dict(layers=config.layers, epochs=config.epochs, warmup=config.warmup_epochs, skip_drop=0.0)]

    # --- the run ----------------------------------------------------------------------

    def make_optimizers(self, searcher, net: nn.Module, stage: dict) -> dict:
        """The optimizers, scheduler and grad scalers of a stage (``w_opt``, ``a_opt``, ``sched``,
        ``w_scaler``, ``a_scaler``). Default: DARTS' SGD and Adam, a cosine schedule."""
        return searcher._make_optimizers(net, stage)

    def make_step(self, searcher, model: nn.Module, net: nn.Module, parts: dict, train_arch: bool, lr: float):
        """The training step of one epoch: ``step(xt, yt, xv, yv)`` on device tensors, returning
        the tensor ``[train loss, train correct, val loss, val correct]`` without host syncs
        (so that a CUDA graph can capture it). ``parts`` holds the optimizers, scheduler and
        grad scalers; ``train_arch`` is False during the warm-up. Default: DARTS' bilevel step.
        """
        return searcher.bilevel_step(model, net, parts, train_arch, lr)

    def arch_gradient(self, searcher, net: nn.Module) -> Callable | None:
        """How the architecture's gradient is taken while it trains: None for the first
        order at the current weights, else a callable with ``UnrolledArchGrad``'s call
        (``(xt, yt, xv, yv, lr, momentum, weight_decay, w_opt, autocast) -> (grads of
        every architecture parameter, val loss, val logits)``). Default: DARTS' unrolled
        second order when ``config.unrolled``."""
        if not searcher.config.unrolled:
            return None
        from fastnas.search.architect import UnrolledArchGrad

        return UnrolledArchGrad(net, searcher.dist)

    def arch_penalty(self, searcher, net: nn.Module) -> Callable[[], torch.Tensor] | None:
        """A differentiable term of the architecture parameters alone that the architecture
        step minimises along with the validation loss (LA-DARTS' predicted latency), as
        ``penalty() -> scalar tensor``; None (the default) for none. Called once per epoch."""
        return None

    def arch_groups(self, net: nn.Module) -> list[list[nn.Parameter]]:
        """The architecture parameters in the order their steps are taken: one group, all
        at once (the default), or several, each stepped in turn with its gradient taken
        after the previous group's step (Scalable-DARTS' factors)."""
        return [net.arch_parameters()]

    def epoch_record(self, searcher, net: nn.Module) -> dict:
        """Fields the method adds to the log record of an epoch, after it trained (default: the
        norm the architecture's gradient was clipped to, where it was)."""
        clip = searcher.config.arch_grad_clip
        return {} if clip is None else {"arch_grad_clip": clip}

    def on_epoch(self, net: nn.Module, config: SearchConfig, stage: dict, epoch: int) -> dict:
        """Set the network's schedules for ``epoch`` of ``stage``; return them for the log."""
        return {}

    def before_evaluation(self, net: nn.Module, config: SearchConfig) -> None:
        """Set the network up for the epoch's validation (default: as it is)."""

    def after_stage(self, net: nn.Module, config: SearchConfig, stage: int) -> dict | None:
        """The candidates of each edge for the next stage (``edge_primitives``), or None to keep them."""
        return None
