"""LA-DARTS (Xu et al., 2020): the architecture minimises ``L_val + lambda * LAT(enc(softmax(alpha)))``,
``LAT`` a regressor of measured latencies (``fastnas.search.latency``, made by ``fastnas latency-model``)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from fastnas.errors import SearchError
from fastnas.search.methods.base import SearchMethod

# The resources key of the loaded predictor (Searcher.resources).
_MODEL = "latency_model"


class LADarts(SearchMethod):
    name = "la-darts"
    summary = "LA-DARTS: L_val + lambda * predicted latency of softmax(alpha) (--latency-model, --latency-weight)"
    # DARTS' first-order settings; the latency term is the method's addition.
    defaults = dict(epochs=50, batch_size=64, lr=0.025, lr_min=0.001, arch_lr=3e-4)
    spaces = ("darts",)
    own_options = ("latency_model", "latency_weight")
    cuda_graph_unsupported = "LA-DARTS' latency term in the architecture step has not been verified under capture"

    def configure(self, values: dict, given: dict) -> None:
        from fastnas.search.latency import file_digest

        path = values.get("latency_model")
        if path and "latency_model_sha256" not in given and os.path.isfile(path):
            values["latency_model_sha256"] = file_digest(path)

    def validate(self, config) -> None:
        from fastnas.search.latency import LatencyModel, LatencyModelError, file_digest
        from fastnas.spaces.darts import DARTS_PRIMITIVES

        super().validate(config)
        if not config.latency_model:
            raise SearchError(
                "la-darts needs --latency-model FILE; make one with: fastnas latency-model --space darts --device cpu"
            )
        if not config.latency_weight >= 0:
            raise SearchError(f"--latency-weight must be >= 0, got {config.latency_weight}")
        if config.partial_channels or config.edge_normalization:
            raise SearchError("la-darts predicts the latency of full DARTS edges; drop --partial-channels")
        model = LatencyModel.load(config.latency_model)
        model.check_fits(config.space, config.primitives or DARTS_PRIMITIVES)
        if config.latency_model_sha256 and file_digest(config.latency_model) != config.latency_model_sha256:
            raise LatencyModelError(
                f"the latency model {config.latency_model} changed since the search began (its SHA-256 differs); "
                "resume with the file the search used, or start a new search"
            )

    def _model(self, searcher, net: nn.Module):
        from fastnas.search.latency import LatencyModel

        model = searcher.resources.get(_MODEL)
        if model is None:
            device = next(net.parameters()).device
            model = searcher.resources[_MODEL] = LatencyModel.load(searcher.config.latency_model, device)
        return model

    def _relaxed_latency(self, model, net: nn.Module) -> torch.Tensor:
        from fastnas.search.latency import encode_weights

        weights = {cell: torch.softmax(getattr(net, f"alphas_{cell}"), dim=-1) for cell in ("normal", "reduce")}
        return model.predict(encode_weights(weights))

    def arch_penalty(self, searcher, net: nn.Module):
        weight = searcher.config.latency_weight
        if weight == 0:
            return None
        model = self._model(searcher, net)
        return lambda: weight * self._relaxed_latency(model, net)

    def epoch_record(self, searcher, net: nn.Module) -> dict:
        model = self._model(searcher, net)
        with torch.no_grad():
            relaxed = float(self._relaxed_latency(model, net))
        return {
            **super().epoch_record(searcher, net),
            "predicted_latency_ms": model.predict_genotype(searcher.space.genotype(net, searcher.config)),
            "relaxed_predicted_latency_ms": relaxed,
        }
