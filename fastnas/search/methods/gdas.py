"""GDAS (Dong and Yang, 2019): one hard Gumbel-softmax sample per edge, temperature annealed.

Checked against AutoDL-Projects (D-X-Y/AutoDL-Projects), the authors' code:

* The sample (``search_model_gdas.py``, ``TinyNetworkGDAS.forward``):
  ``softmax((log_softmax(alpha) + gumbel) / tau)``, redrawn while it holds inf or
  NaN, its argmax as a one-hot with the soft sample's gradient
  (``fastnas.nn.supernet.gumbel_softmax_hard``).
* The edge: on NAS-Bench-201, ``NAS201SearchCell.forward_gdas``
  (``xautodl/models/cell_searchs/search_cells.py``) sums
  ``hardwts[j] * op_j(x) if j == argmax else hardwts[j]`` over the candidates:
  the other hard weights are 0 in value but pass their straight-through
  gradient on, so every alpha of the edge learns from each step. The
  NASNet-space GDAS (``search_model_gdas_nasnet.py`` through
  ``MixedOp.forward_gdas``) returns ``op_a(x) * hardwts[a]`` alone, as does the
  variant ``forward_gdas_v1`` of AutoDL issue #119. ``--gdas-form`` chooses
  (``fastnas.nn.mixed_op.HARD_FORMS``); the default is the authors' form for the
  space searched: "sum" on nb201, "one" on darts.
* The loop (``exps/NAS-Bench-201-algos/GDAS.py``, ``search_func``): each step
  updates the weights on a training batch first, then the architecture on a
  validation batch, each with its own Gumbel sample (``weights_first``).
  ``tau = tau_max - (tau_max - tau_min) * epoch / (epochs - 1)``, 10 to 0.1
  (``scripts-search/NAS-Bench-201-algos/GDAS.sh``); Adam 3e-4, betas (0.5, 0.999),
  weight decay 1e-3 for the alphas, as DARTS'.

Left as they are: AutoDL's NAS-Bench-201 config (``configs/nas-benchmark/algos/GDAS.config``)
runs 250 epochs with Nesterov momentum and weight decay 5e-4, where the defaults
here are the paper's CIFAR search (240 epochs, DARTS' SGD); its weight step clips
the norm of ``network.parameters()``, which holds the alphas' gradient of the
training loss too, where fastnas clips the weights' alone.
"""

from __future__ import annotations

import torch.nn as nn

from fastnas.errors import SearchError
from fastnas.search.methods.base import SearchMethod

# The authors' hard-sample form of each space (see the module docstring).
SPACE_FORMS = {"nb201": "sum", "darts": "one"}


class GDAS(SearchMethod):
    name = "gdas"
    summary = "GDAS: one Gumbel-softmax sampled candidate per edge, temperature 10 -> 0.1"
    defaults = dict(epochs=240, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4, tau_max=10.0, tau_min=0.1)
    own_options = ("gdas_form",)
    weights_first = True
    # One candidate per edge runs, so most weights get no gradient in a step.
    ddp_find_unused_parameters = True
    cuda_graph_unsupported = (
        "GDAS samples its one candidate per edge on the host (a Gumbel resampling loop that reads the samples "
        "back, and the chosen indices pick which operations run), which changes the kernels from step to step"
    )

    def configure(self, values: dict, given: dict) -> None:
        if "gdas_form" not in given:
            values["gdas_form"] = SPACE_FORMS.get(values["space"], "one")

    def validate(self, config) -> None:
        from fastnas.nn.mixed_op import HARD_FORMS

        super().validate(config)
        if config.gdas_form is not None and config.gdas_form not in HARD_FORMS:
            raise SearchError(f"--gdas-form must be one of {', '.join(HARD_FORMS)}, got {config.gdas_form!r}")
        if config.partial_channels and self.form(config) != "one":
            raise SearchError("gdas with --partial-channels takes --gdas-form one")

    @staticmethod
    def form(config) -> str:
        """The hard-sample form of this search (a checkpoint from before ``gdas_form``: the space's)."""
        return config.gdas_form or SPACE_FORMS.get(config.space, "one")

    def on_epoch(self, net: nn.Module, config, stage: dict, epoch: int) -> dict:
        span = max(1, stage["epochs"] - 1)
        tau = config.tau_max - (config.tau_max - config.tau_min) * epoch / span
        net.set_sampling("gumbel", tau, hard_form=self.form(config))
        return {"tau": tau, "gdas_form": self.form(config)}
