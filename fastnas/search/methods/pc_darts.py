"""PC-DARTS (Xu et al., 2020): partial channels and edge normalisation, first order.

Checked against the released code (yuhuixu1993/PC-DARTS). CIFAR (``train_search.py``):
batch 256, SGD 0.1 cosine to 0, Adam 6e-4 for the architecture from epoch 15 of
50, K = 4; its architecture step (``architect.py``, ``Architect.step``) clips
nothing. ImageNet (``train_search_imagenet.py``): batch 1024, SGD 0.5, Adam 6e-3,
the architecture from epoch 35 (``--begin``), K = 2, and the architecture's
gradient clipped to norm 5 (``clip_grad_norm_(model.module.arch_parameters(),
args.grad_clip)``): ``arch_grad_clip`` on ImageNet only.
"""

from __future__ import annotations

from fastnas.search.methods.base import SearchMethod

# train_search_imagenet.py: the architecture learns from epoch 35 of 50.
IMAGENET_WARMUP = 35


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
        if values["dataset"] != "imagenet":
            return
        imagenet = dict(partial_channels=2, batch_size=1024, lr=0.5, arch_lr=6e-3, arch_grad_clip=5.0)
        for key, value in imagenet.items():
            if key not in given:
                values[key] = value
        if "warmup_epochs" not in given:
            values["warmup_epochs"] = int(round(values["epochs"] * IMAGENET_WARMUP / self.paper_epochs))
