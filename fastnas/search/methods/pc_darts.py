"""PC-DARTS (Xu et al., 2020): partial channels and edge normalisation, first order."""

from __future__ import annotations

from fastnas.search.methods.base import SearchMethod


class PCDarts(SearchMethod):
    name = "pc-darts"
    summary = "PC-DARTS: 1/K of the channels through the candidates, edge normalisation, 15 warm-up epochs"
    defaults = dict(
        epochs=50, batch_size=256, lr=0.1, lr_min=0.0, arch_lr=6e-4, partial_channels=4,
        edge_normalization=True, warmup_epochs=15,
    )  # fmt: skip
    digits_epochs = 4
    paper_epochs = 50
    spaces = ("darts",)

    def configure(self, values: dict, given: dict) -> None:
        if values["dataset"] == "imagenet" and "partial_channels" not in given:
            values["partial_channels"] = 2
