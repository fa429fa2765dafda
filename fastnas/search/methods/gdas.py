"""GDAS (Dong and Yang, 2019): one hard Gumbel-softmax sample per edge, temperature annealed."""

from __future__ import annotations

import torch.nn as nn

from fastnas.search.methods.base import SearchMethod


class GDAS(SearchMethod):
    name = "gdas"
    summary = "GDAS: one Gumbel-softmax sampled candidate per edge, temperature 10 -> 0.1"
    defaults = dict(epochs=240, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4, tau_max=10.0, tau_min=0.1)
    # One candidate per edge runs, so most weights get no gradient in a step.
    ddp_find_unused_parameters = True
    cuda_graph_unsupported = (
        "GDAS samples its one candidate per edge on the host (a Gumbel resampling loop that reads the samples "
        "back, and the chosen indices pick which operations run), which changes the kernels from step to step"
    )

    def on_epoch(self, net: nn.Module, config, stage: dict, epoch: int) -> dict:
        span = max(1, stage["epochs"] - 1)
        tau = config.tau_max - (config.tau_max - config.tau_min) * epoch / span
        net.set_sampling("gumbel", tau)
        return {"tau": tau}
