"""PC-DARTS (Xu et al., 2020): partial channels and edge normalisation, first order.

Checked against the released code (yuhuixu1993/PC-DARTS). CIFAR (``train_search.py``):
batch 256, SGD 0.1 cosine to 0, Adam 6e-4 for the architecture from epoch 15 of
50, K = 4; its architecture step (``architect.py``, ``Architect.step``) clips
nothing. ImageNet (``train_search_imagenet.py``): batch 1024, SGD 0.5, Adam 6e-3,
the architecture from epoch 35 (``--begin``), K = 2, and the architecture's
gradient clipped to norm 5 (``clip_grad_norm_(model.module.arch_parameters(),
args.grad_clip)``): ``arch_grad_clip`` on ImageNet only. ``IMAGENET_RECIPE`` below
holds every ImageNet value, each with where it is in that file.
"""

from __future__ import annotations

from fastnas.search.methods.base import SearchMethod

# yuhuixu1993/PC-DARTS train_search_imagenet.py, its argparse defaults and main():
IMAGENET_RECIPE = dict(
    epochs=50,  # --epochs 50
    batch_size=1024,  # --batch_size 1024
    lr=0.5,  # --learning_rate 0.5
    lr_min=0.0,  # --learning_rate_min 0.0 (CosineAnnealingLR over the 50 epochs)
    momentum=0.9,  # --momentum 0.9
    weight_decay=3e-4,  # --weight_decay 3e-4
    grad_clip=5.0,  # --grad_clip 5: the weights' clip_grad_norm_ ...
    arch_grad_clip=5.0,  # ... and the same args.grad_clip on the architecture's gradient
    arch_lr=6e-3,  # --arch_learning_rate 6e-3, Adam betas (0.5, 0.999)
    arch_weight_decay=1e-3,  # --arch_weight_decay 1e-3
    init_channels=16,  # --init_channels 16
    layers=8,  # --layers 8
    partial_channels=2,  # model_search_imagenet.py: MixedOp's k = 2 (CIFAR's model_search.py: 4)
    # "we random sample 10% and 2.5% from training set (each class) as train and val": two
    # disjoint per-class samples of ImageNet's training set, read from imagenet_search/train
    # and imagenet_search/val. Here 12.5% of each class, split 80/20 within each class.
    fraction=0.125,
    train_portion=0.8,
)
# --begin 35: the architecture learns from epoch 35 of 50.
IMAGENET_WARMUP = 35
# ``if epoch < 5 and args.batch_size > 256``: lr * (epoch + 1) / 5, then the cosine schedule.
IMAGENET_LR_WARMUP = 5
IMAGENET_LR_WARMUP_MIN_BATCH = 256
IMAGENET_EPOCHS = 50


def apply_imagenet_recipe(values: dict, given: dict, recipe: dict) -> None:
    """Fill ``values`` with ``recipe`` and PC-DARTS' ImageNet warm-ups, where not ``given``.

    Both warm-ups scale with ``--epochs`` (35 and 5 of 50); the learning-rate warm-up applies,
    as in the code, only to batches above 256.
    """
    for key, value in recipe.items():
        if key not in given:
            values[key] = value
    if "warmup_epochs" not in given:
        values["warmup_epochs"] = int(round(values["epochs"] * IMAGENET_WARMUP / IMAGENET_EPOCHS))
    if "lr_warmup_epochs" not in given:
        big = values["batch_size"] > IMAGENET_LR_WARMUP_MIN_BATCH
        values["lr_warmup_epochs"] = int(round(values["epochs"] * IMAGENET_LR_WARMUP / IMAGENET_EPOCHS)) if big else 0


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
        apply_imagenet_recipe(values, given, IMAGENET_RECIPE)
