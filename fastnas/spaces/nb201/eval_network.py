"""The NAS-Bench-201 stand-alone network: one architecture trained from scratch (Dong and Yang, 2020).

The benchmark's macro skeleton (AutoDL ``TinyNetwork``): a 3x3 convolution and
batch norm stem, three stages of N cells of C, 2C and 4C channels joined by
residual stride-2 blocks, a final batch norm and ReLU, global pooling and a
linear classifier. Every edge of a cell is the one operation the architecture
names, with affine batch norms.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastnas.nn.operations import OPS, check_primitives
from fastnas.spaces.nb201.blocks import ResNetBasicBlock
from fastnas.spaces.nb201.genotype import NB201_NODES, NB201Arch


def check_eval_arch(arch: NB201Arch) -> None:
    """Raise ValueError unless ``arch`` has the benchmark's node count and registered operations."""
    if len(arch.nodes) != NB201_NODES - 1:
        edges = sum(len(node) for node in arch.nodes)
        raise ValueError(
            f"a NAS-Bench-201 cell has {NB201_NODES - 1} nodes and 6 edges; {arch.to_string()!r} has "
            f"{len(arch.nodes)} nodes and {edges} edges"
        )
    check_primitives(sorted({op for node in arch.nodes for op, _ in node}), "the architecture's operations")


class NB201InferCell(nn.Module):
    """A NAS-Bench-201 cell of one architecture: node i sums its edges from every earlier node.

    A ``none`` edge stays in (as zeros), as in the benchmark's cells.
    """

    def __init__(self, arch: NB201Arch, C: int):
        super().__init__()
        self.sources = [[j for _, j in node] for node in arch.nodes]
        self.edges = nn.ModuleList(nn.ModuleList(OPS[op](C, 1, True) for op, _ in node) for node in arch.nodes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for sources, ops in zip(self.sources, self.edges):
            total = None
            for j, op in zip(sources, ops):
                out = op(nodes[j])
                total = out if total is None else total + out
            nodes.append(total)
        return nodes[-1]


class NB201Network(nn.Module):
    """The NAS-Bench-201 network of ``arch`` (C=16, N=5 in the benchmark).

    Args:
        arch: the cell.
        C: channels of the first stage (doubled at each reduction).
        N: cells per stage.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.

    ``forward`` returns ``(logits, None)``, the same pair as the DARTS evaluation
    networks (NAS-Bench-201 has no auxiliary head).
    """

    def __init__(self, arch: NB201Arch, C: int = 16, N: int = 5, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        check_eval_arch(arch)
        self.arch = arch
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage in range(3):
            C_curr = C * 2**stage
            if stage > 0:
                self.cells.append(ResNetBasicBlock(C_prev, C_curr, 2))
            for _ in range(N):
                self.cells.append(NB201InferCell(arch, C_curr))
            C_prev = C_curr
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = self.stem(x)
        for cell in self.cells:
            out = cell(out)
        out = self.global_pooling(self.lastact(out))
        return self.classifier(out.flatten(1)), None

    def has_unused_parameters(self) -> bool:
        """Never: a ``none`` edge multiplies by zero and so keeps its inputs in the graph."""
        return False


# --- the benchmark's training recipe (fastnas train) -------------------------------------

# NAS-Bench-201 (AutoDL configs/nas-benchmark/hyper-opts/200E.config): C=16, N=5, 200 epochs of
# batch 256, SGD Nesterov 0.1 cosine to 0, wd 5e-4, no clipping; random crops (padding 4) and flips.
NB201_CIFAR = dict(
    init_channels=16, layers=5, auxiliary=False, drop_path_prob=0.0,
    epochs=200, batch_size=256, lr=0.1, lr_schedule="cosine", lr_min=0.0, nesterov=True, weight_decay=5e-4,
    grad_clip=None, crop_padding=4, flip=True, cutout=0,
)  # fmt: skip

# The benchmark trains on ImageNet as ImageNet16-120: 16x16 images, crops with padding 2.
NB201_IMAGENET = dict(NB201_CIFAR, image_size=16, crop_padding=2)

# The bundled digits (8x8): two cells per stage, 30 epochs, crops padded by 1, no flips.
DIGITS_NB201 = dict(
    NB201_CIFAR, init_channels=16, layers=2, epochs=30, batch_size=96, image_size=8, crop_padding=1, flip=False,
)  # fmt: skip
TRAIN_DEFAULTS = {"digits": DIGITS_NB201, "cifar10": NB201_CIFAR, "cifar100": NB201_CIFAR, "imagenet": NB201_IMAGENET}
