"""What every supernet shares: parameter groups, sampling mode, skip dropout, paths.

A *path* (single-path and one-shot supernets: SPOS, FairNAS, Bender et al.'s
one-shot model) names, for each choice block of the network (an edge of a
cell, shared by every cell of its type, or a layer), the candidates that run:
a tuple of candidate indices, summed; ``()`` gives zeros. ``set_path`` makes
every forward run that path and nothing else, until ``set_path(None)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastnas.nn.mixed_op import MixedOp, PartialChannelMixedOp, check_hard_form

SAMPLING_MODES = ("softmax", "gumbel")


def gumbel_softmax_hard(logits: torch.Tensor, tau: float, max_tries: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel-softmax over the last dimension (GDAS).

    Returns ``(hard, index)``: ``hard`` is one-hot in value, with the gradient of
    the soft sample; ``index`` is the sampled candidate of every row. Samples
    whose soft weights contain inf or NaN (a Gumbel draw of -log(0), or a tiny
    tau) are drawn again, as GDAS does.
    """
    for _ in range(max_tries):
        gumbels = -torch.empty_like(logits).exponential_().log()
        soft = torch.softmax((logits.log_softmax(dim=-1) + gumbels) / tau, dim=-1)
        if torch.isfinite(gumbels).all() and torch.isfinite(soft).all():
            index = soft.argmax(dim=-1)
            one_hot = torch.zeros_like(soft).scatter_(-1, index.unsqueeze(-1), 1.0)
            return one_hot - soft.detach() + soft, index
    raise FloatingPointError(
        f"Gumbel-softmax gave inf/NaN weights {max_tries} times in a row (tau={tau}); "
        "the architecture parameters are probably not finite"
    )


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the distributions in the rows of ``probs``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


class SuperNet(nn.Module):
    """Base of the search networks; subclasses define ``arch_parameters``."""

    def __init__(self):
        super().__init__()
        self.sampling = "softmax"
        self.tau = 1.0
        self._skip_drop_prob = 0.0
        self._path: tuple[tuple[int, ...], ...] | None = None

    # --- paths ------------------------------------------------------------------------

    def choice_candidates(self) -> list[list[str]]:
        """The candidate names of every choice block, in path order."""
        raise NotImplementedError

    def choice_nodes(self) -> list[list[int]]:
        """The choice blocks feeding each node (summed into it), in path order; a layer is a node of its own."""
        raise NotImplementedError

    def encoding(self):
        """The architectures of this supernet as gene vectors (``fastnas.spaces.encoding.Encoding``)."""
        raise NotImplementedError

    def choice_sizes(self) -> list[int]:
        """How many candidates each choice block has."""
        return [len(names) for names in self.choice_candidates()]

    @property
    def path(self) -> tuple[tuple[int, ...], ...] | None:
        """The path every forward runs, or None (the weighted sum of ``sampling``)."""
        return self._path

    def set_path(self, path) -> None:
        """Run only ``path`` from now on: one tuple (or int) of candidate indices per choice block; None to stop."""
        if path is None:
            self._path = None
            return
        sizes = self.choice_sizes()
        path = tuple((entry,) if isinstance(entry, int) else tuple(entry) for entry in path)
        if len(path) != len(sizes):
            raise ValueError(f"a path of this network has {len(sizes)} entries (one per choice block), got {len(path)}")
        for b, (entry, size) in enumerate(zip(path, sizes)):
            if any(not 0 <= k < size for k in entry):
                raise ValueError(f"path entry {b} names candidates {entry}; choice block {b} has {size}")
        self._path = path

    def use_batch_statistics(self) -> None:
        """Batch norms normalise with the statistics of the batch they see, in training and evaluation
        alike, and keep no running statistics (``track_running_stats=False``)."""
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        for m in self.modules():
            if isinstance(m, MixedOp):
                m.replan()

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (alphas, and betas where used)."""
        raise NotImplementedError

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def set_sampling(self, mode: str = "softmax", tau: float = 1.0, hard_form: str | None = None) -> None:
        """Choose how edge weights come from the alphas.

        "softmax": every candidate, weighted by softmax(alpha) (DARTS).
        "gumbel": one hard Gumbel-softmax sample per edge and forward pass,
        temperature ``tau``; only the sampled candidate runs, forward and
        backward, and the alphas get the straight-through gradient (GDAS).
        ``hard_form`` ("sum" or "one", ``fastnas.nn.mixed_op.HARD_FORMS``; None
        keeps each edge's) is how an edge computes its sample: "sum" adds the
        other hard weights (0 in value), so that every candidate's weight gets
        a gradient, as AutoDL's NAS-Bench-201 GDAS; "one" scales the sampled
        candidate alone, as AutoDL's NASNet-space GDAS. Partial-channel edges
        take "one" only.
        """
        if mode not in SAMPLING_MODES:
            raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if hard_form is not None:
            check_hard_form(hard_form)
            for m in self.modules():
                if isinstance(m, PartialChannelMixedOp) and hard_form != "one":
                    raise ValueError("partial-channel edges take GDAS hard samples in the 'one' form only")
            for m in self.modules():
                if isinstance(m, MixedOp):
                    m.hard_form = hard_form
        self.sampling = mode
        self.tau = float(tau)

    @property
    def skip_drop_prob(self) -> float:
        """Dropout probability on the identity skip_connect candidates in training (P-DARTS)."""
        return self._skip_drop_prob

    @skip_drop_prob.setter
    def skip_drop_prob(self, p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"skip_drop_prob must be in [0, 1), got {p}")
        self._skip_drop_prob = float(p)
        for m in self.modules():
            if isinstance(m, MixedOp):
                m.skip_drop_prob = float(p)

    def _edge_weights(self, alphas: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, list | None]:
        """Per-edge candidate weights, and the sampled candidates in gumbel mode; with a path set,
        weights of one (not read) and the path's entries of these edges (from ``offset``)."""
        if self._path is not None:
            return torch.ones_like(alphas).detach(), list(self._path[offset : offset + alphas.shape[0]])
        if self.sampling == "softmax":
            return torch.softmax(alphas, dim=-1), None
        hard, index = gumbel_softmax_hard(alphas, self.tau)
        return hard, index.tolist()
