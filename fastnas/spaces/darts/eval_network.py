"""The DARTS evaluation networks: a found genotype stacked into a network trained from scratch.

Follows DARTS (Liu et al., 2019, ``cnn/model.py``): ``NetworkCIFAR`` (a 3x3
stem, ``layers`` cells with reductions at 1/3 and 2/3 of the depth, an optional
auxiliary head after the second reduction) and ``NetworkImageNet`` (the
three-convolution stem, 224 -> 28, the same cells). Each edge is the one
candidate the genotype names, built from ``fastnas.nn.operations.OPS`` with
affine batch norms, and drop-path regularises every edge that is not an identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fastnas.nn.operations import OPS, FactorizedReduce, Identity, ReLUConvBN, check_primitives, drop_path
from fastnas.spaces.darts.genotype import Genotype, validate_genotype


def cell_steps(genotype: Genotype) -> int:
    """Intermediate nodes of the genotype's cells (two edges each)."""
    return len(genotype.normal) // 2


def check_eval_genotype(genotype: Genotype) -> None:
    """Raise ValueError unless every candidate is registered and both cells are well formed."""
    steps = cell_steps(genotype)
    validate_genotype(genotype, steps=steps)
    for cell in ("normal", "reduce"):
        check_primitives(sorted({op for op, _ in getattr(genotype, cell)}), f"genotype.{cell}")


def unused_states(gene: Sequence[tuple[str, int]], concat: Sequence[int]) -> set[int]:
    """Intermediate states that reach neither the output nor a state that does.

    Their edges get no gradient, which distributed training has to be told about.
    """
    steps = len(gene) // 2
    used = set(concat)
    for node in reversed(range(steps)):
        if 2 + node in used:
            used.update(j for _, j in gene[2 * node : 2 * node + 2])
    return {2 + node for node in range(steps)} - used


class EvalCell(nn.Module):
    """A discrete DARTS cell: two preprocessed inputs, two edges per node, the concat states joined.

    Args:
        gene: (op name, input state) per edge, two per node in node order.
        concat: the states joined into the output.
        C_prev_prev, C_prev: channels of the two cell inputs.
        C: channels of every node.
        reduction: edges from the cell inputs stride 2.
        reduction_prev: input 0 comes from before the previous cell's reduction.
    """

    def __init__(
        self,
        gene: Sequence[tuple[str, int]],
        concat: Sequence[int],
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        self.steps = len(gene) // 2
        self.inputs = [j for _, j in gene]
        self.concat = list(concat)
        self.multiplier = len(self.concat)
        self.ops = nn.ModuleList(OPS[op](C, 2 if reduction and j < 2 else 1, True) for op, j in gene)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(self.steps):
            total = None
            for e in (2 * node, 2 * node + 1):
                op = self.ops[e]
                h = op(states[self.inputs[e]])
                # An identity has nothing to regularise; DARTS leaves it alone.
                if self.training and drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """The auxiliary classifier of the CIFAR network, for an 8x8 input: pool to 2x2, 1x1 and 2x2 convolutions."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            # Not in place (DARTS' is): the head's input goes on into the next cells.
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AuxiliaryHeadImageNet(nn.Module):
    """The auxiliary classifier of the ImageNet network, for the 7x7 output of the second reduction cell.

    DARTS trained it without a batch norm after the 768-channel convolution (a
    slip its code keeps for consistency with the paper's results); so does this.
    """

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _EvalNetwork(nn.Module):
    """Cells, auxiliary head and classifier shared by the CIFAR and ImageNet networks.

    ``forward`` returns ``(logits, auxiliary logits)``; the second is None
    unless the network has an auxiliary head and is training. ``drop_path_prob``
    is set by the training loop before each epoch.
    """

    auxiliary_head: nn.Module | None

    def _build_cells(
        self, genotype: Genotype, C: int, layers: int, C_prev_prev: int, C_prev: int, reduction_prev: bool
    ) -> int:
        """Append the cells; returns the channels of the cell after the second reduction."""
        self.cells = nn.ModuleList()
        self.aux_position = 2 * layers // 3
        C_aux = C_prev
        C_curr = C
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            kind = "reduce" if reduction else "normal"
            cell = EvalCell(
                getattr(genotype, kind),
                getattr(genotype, f"{kind}_concat"),
                C_prev_prev,
                C_prev,
                C_curr,
                reduction,
                reduction_prev,
            )
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_position:
                C_aux = C_prev
        self.C_final = C_prev
        return C_aux

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        s0, s1 = self._stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux

    def has_unused_parameters(self) -> bool:
        """Whether some edge's output never reaches the network's output (DDP must then look for them)."""
        return any(
            unused_states(getattr(self.genotype, kind), getattr(self.genotype, f"{kind}_concat"))
            for kind in ("normal", "reduce")
        )


class NetworkCIFAR(_EvalNetwork):
    """The DARTS CIFAR evaluation network (C=36, 20 cells, auxiliary head in the paper).

    Args:
        C: channels of the first cells (doubled at each reduction).
        num_classes: outputs of the classifier.
        layers: cells; reductions at layers // 3 and 2 * layers // 3.
        auxiliary: add the auxiliary head after cell 2 * layers // 3 (it expects 8x8 there, i.e. 32x32 images).
        genotype: the cells.
        in_channels: channels of the input images.
        stem_multiplier: the stem has stem_multiplier * C channels (3, as DARTS).
    """

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        auxiliary: bool,
        genotype: Genotype,
        in_channels: int = 3,
        stem_multiplier: int = 3,
    ):
        super().__init__()
        check_eval_genotype(genotype)
        self.genotype = genotype
        self.drop_path_prob = 0.0
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        C_aux = self._build_cells(genotype, C, layers, C_stem, C_stem, False)
        self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.C_final, num_classes)

    def _stem(self, x):
        s = self.stem(x)
        return s, s


class NetworkImageNet(_EvalNetwork):
    """The DARTS ImageNet evaluation network (C=48, 14 cells, auxiliary head in the paper).

    The stem takes 224x224 to 56x56 (s0) and 28x28 (s1) with three stride-2
    3x3 convolutions. DARTS pools the final 7x7 with ``AvgPool2d(7)``; global
    average pooling is the same there and lets other image sizes through.
    Arguments as ``NetworkCIFAR``; the auxiliary head expects 7x7 after the second reduction (224x224 images).
    """

    def __init__(
        self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype, in_channels: int = 3
    ):
        super().__init__()
        check_eval_genotype(genotype)
        self.genotype = genotype
        self.drop_path_prob = 0.0
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        # Not in place (DARTS' is): s0 is also the first cell's input.
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        C_aux = self._build_cells(genotype, C, layers, C, C, True)
        self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.C_final, num_classes)

    def _stem(self, x):
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


# --- the papers' training recipes (fastnas train) ------------------------------------

# DARTS cnn/train.py: NetworkCIFAR, C=36, 20 cells, auxiliary head (weight 0.4),
# drop-path to 0.2, cutout 16, 600 epochs of batch 96, SGD 0.025 cosine to 0, wd 3e-4, clip 5.
DARTS_CIFAR = dict(
    init_channels=36, layers=20, auxiliary=True, auxiliary_weight=0.4, drop_path_prob=0.2,
    epochs=600, batch_size=96, lr=0.025, lr_schedule="cosine", lr_min=0.0, weight_decay=3e-4, grad_clip=5.0,
    crop_padding=4, flip=True, cutout=16,
)  # fmt: skip

# DARTS cnn/train_imagenet.py: NetworkImageNet, C=48, 14 cells, auxiliary head, label smoothing 0.1,
# 250 epochs of batch 128, SGD 0.1 times 0.97 after every epoch, wd 3e-5, clip 5, no drop-path;
# random resized crops, flips and colour jitter (0.4, 0.4, 0.4, 0.2).
DARTS_IMAGENET = dict(
    init_channels=48, layers=14, auxiliary=True, auxiliary_weight=0.4, drop_path_prob=0.0, label_smoothing=0.1,
    epochs=250, batch_size=128, lr=0.1, lr_schedule="exponential", lr_gamma=0.97, weight_decay=3e-5, grad_clip=5.0,
    image_size=224, crop_padding=0, flip=True, cutout=0, imagenet_augment=True,
)  # fmt: skip

# The bundled digits are 8x8: a small network and 30 epochs train in a few minutes on
# one CPU thread. Augmentation scales with the side: crops pad 1 pixel (4 of CIFAR's 32),
# cutout erases 2x2 (DARTS' 16 of 32 would blank a quarter of a digit, enough to change
# it into another); no flips, which turn digits into other shapes. The auxiliary head
# needs 8x8 after the second reduction (32x32 images), so it is off.
DIGITS_DARTS = dict(
    DARTS_CIFAR, init_channels=16, layers=8, auxiliary=False, epochs=30, batch_size=96, image_size=8,
    crop_padding=1, flip=False, cutout=2,
)  # fmt: skip
TRAIN_DEFAULTS = {"digits": DIGITS_DARTS, "cifar10": DARTS_CIFAR, "cifar100": DARTS_CIFAR, "imagenet": DARTS_IMAGENET}
