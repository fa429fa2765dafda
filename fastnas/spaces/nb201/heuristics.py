"""Yu et al.'s supernet-training heuristics on the NAS-Bench-201 supernet.

"How to Train Your Super-Net: An Analysis of Training Heuristics in Weight-Sharing
NAS" (Yu, Ranftl and Salzmann) trains the NAS-Bench-201 supernet with each of a set
of heuristics and compares the ranking correlations they give. Their code
(kcyu2014/nas-landmarkreg, ``nasws/cnn``; options in ``policy/cnn_search_configs.py``)
defines what each one is; here are those that change the nb201 supernet
(``NB201SearchNetwork``), each a ``SearchConfig`` field:

* ``ops_on_nodes`` (the study's ``--supernet_cell_type op_on_node``, against
  ``op_on_edge``): ``SearchCellOnNode`` in
  ``search_space/nasbench201/lib/models/cell_searchs/search_cells.py`` gives node
  i's edge from the cell input (node 0) and its edge from node 1 candidates of
  their own, and makes every further incoming edge of node i (from nodes 2, ...)
  run the candidates of its edge from node 1. In the 4-node cell that is one
  sharing: the edge 2 -> 3 runs the modules of the edge 1 -> 3, so a cell holds 5
  sets of candidates, not 6 (``share_node_ops``). The architectures, paths and
  encoding are unchanged.
* ``ofa_kernel`` (the study's OFA kernel transformation, ``--nasbenchnet_vertex_type
  mixedvertex_ofa`` with ``--ofa_parameter_transform 1``): ``MixedVertexOFA`` in
  ``search_space/nasbench101/operations.py`` runs the 1x1 and the 3x3 convolution
  candidates of a node through one ``KernelTransformDynamicConv2d``
  (``operations/ofa/ofa_dynamic_ops.py``) and one batch norm: the weight is the
  3x3 kernel, and the 1x1 kernel is its centre times a learned transformation
  matrix (``3to1_matrix``, 1x1, initialised to the identity), OFA's elastic
  kernel. The study's code does this in NAS-Bench-101, whose convolutions are the
  same pair; its NAS-Bench-201 cells have none, so here it is that form carried
  over to nb201's ``nor_conv_1x1`` and ``nor_conv_3x3`` on every edge
  (``share_kernels``; each keeps nb201's ReLU, convolution, batch norm order).
  The 3x3 weight starts as the 3x3 candidate's would without the option.
* ``global_dropout`` (``--global_dropout_rate``): ``NASBench201NetSearch`` in
  ``search_space/nasbench201/model_search.py`` applies ``nn.Dropout`` of this
  rate to the globally pooled features, before the classifier.
* ``layer_path_dropout`` (``--path_dropout_rate``, "NAO way of dropout path,
  scheduled with the layer id"): ``SearchCell.forward_dynamic`` applies
  ``apply_drop_path`` (``operations/dropout.py``) to each search cell's output,
  zeroing whole images with probability ``rate * (l + 1) / L``, ``l`` the cell's
  index and ``L`` the number of cells and residual reductions (3N + 2), and
  scaling the kept ones by 1 / (1 - p) (``layer_drop_probability``; the drop is
  ``fastnas.nn.operations.drop_path``). It does not ramp over epochs, unlike
  fastnas's ``path_dropout``, which drops candidates of a path. The study's
  forward applies it in evaluation too; here it applies in training only, so
  that ``select`` and ``rank-eval`` score architectures without random drops.

Label smoothing (the study's ``--label_smooth``, ``CrossEntropyLabelSmooth`` in
``operations/loss.py``: targets ``(1 - e) * onehot + e / classes``, the training
loss only) is ``SearchConfig.label_smoothing``, which the single-path step
(``fastnas.search.methods.single_path``) passes to ``F.cross_entropy``, the same
loss, in any space. SPOS smooths by 0.1 by default (its released code), so
``rank-eval``'s default comparison (``fastnas.tools.rank_eval.heuristics``)
turns it off for SPOS and on for the others.

Left out: dynamic channels (the study's ``--dynamic_conv_method``,
``DynamicConv2d`` / ``ChannelDropout`` in ``search_space/nasbench101/operations.py``).
In NAS-Bench-101 the channels of a node depend on the architecture (the cell's
output channels are split over the nodes that feed it), so the supernet holds
the widest convolution and each architecture uses a slice of its channels. In
NAS-Bench-201 every node of every architecture has the channels of its stage,
so each architecture would use the whole weight and the option would change
nothing; the study's code has no dynamic channels for NAS-Bench-201 either.
Sampling widths the space does not have would be another search space, not this
heuristic.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: SearchConfig fields that only the nb201 supernet reads (``NB201Space.supernet_options``).
SUPERNET_OPTIONS = ("global_dropout", "layer_path_dropout", "ops_on_nodes", "ofa_kernel")

#: The candidates whose convolutions ``ofa_kernel`` shares: (small, large) kernel.
OFA_PAIR = ("nor_conv_1x1", "nor_conv_3x3")


def node_op_sources(edges: list[tuple[int, int]]) -> list[int]:
    """For each edge (target i, source j), the edge whose candidates it runs with ops on nodes:
    itself for j = 0 and j = 1, node i's edge from node 1 for j >= 2 (``SearchCellOnNode``)."""
    index = {edge: e for e, edge in enumerate(edges)}
    return [index[(i, 1)] if j >= 2 else e for e, (i, j) in enumerate(edges)]


def share_node_ops(mixed_ops: nn.ModuleList, edges: list[tuple[int, int]]) -> None:
    """Make every edge of ``mixed_ops`` run the candidates ``node_op_sources`` names (in place).

    The shared edge is the same module in two places of the list: its parameters
    count once, and each call runs it on its own input with its own path entry.
    """
    for e, source in enumerate(node_op_sources(edges)):
        if source != e:
            mixed_ops[e] = mixed_ops[source]


class ElasticKernel(nn.Module):
    """One convolution weight for kernels of several odd sizes (OFA's elastic kernel).

    ``weight`` is the largest kernel; a smaller one is the centre of the next larger
    one, flattened and multiplied by a learned (k*k x k*k) matrix, initialised to the
    identity, step by step down to the size asked for (``KernelTransformDynamicConv2d.get_active_filter``).
    """

    def __init__(self, weight: nn.Parameter, sizes):
        super().__init__()
        sizes = sorted(set(int(k) for k in sizes))
        if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] != sizes[-1]:
            raise ValueError(
                f"ElasticKernel: weight of shape {tuple(weight.shape)} is not a {sizes[-1]}x{sizes[-1]} kernel"
            )
        if any(k % 2 == 0 for k in sizes):
            raise ValueError(f"ElasticKernel: kernel sizes must be odd, got {sizes}")
        self.sizes = tuple(sizes)
        self.weight = weight
        for small, large in zip(sizes, sizes[1:]):
            self.register_parameter(self._matrix_name(large, small), nn.Parameter(torch.eye(small * small)))

    @staticmethod
    def _matrix_name(large: int, small: int) -> str:
        return f"transform_{large}to{small}"

    def kernel(self, k: int) -> torch.Tensor:
        """The k x k kernel."""
        if k not in self.sizes:
            raise ValueError(f"ElasticKernel: no {k}x{k} kernel; sizes are {self.sizes}")
        w = self.weight
        for large, small in zip(self.sizes[::-1], self.sizes[-2::-1]):
            if large <= k:
                break
            start = (large - small) // 2
            centre = w[:, :, start : start + small, start : start + small].reshape(-1, small * small)
            matrix = getattr(self, self._matrix_name(large, small))
            w = F.linear(centre, matrix).reshape(w.shape[0], w.shape[1], small, small)
        return w

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class ElasticReLUConvBN(nn.Module):
    """An nb201 ``nor_conv_kxk`` candidate whose kernel and batch norm are shared with the
    other kernel sizes of its edge: activation, convolution with ``kernel.kernel(k)``
    ("same" padding), batch norm."""

    def __init__(self, activation: nn.Module, kernel: ElasticKernel, k: int, bn: nn.BatchNorm2d, stride: int = 1):
        super().__init__()
        self.act = activation
        self.kernel = kernel
        self.bn = bn
        self.k = k
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.kernel.kernel(self.k)
        return self.bn(F.conv2d(self.act(x), w, stride=self.stride, padding=self.k // 2))

    def extra_repr(self) -> str:
        return f"k={self.k}, stride={self.stride}"


def share_kernels(mixed_op: nn.Module) -> None:
    """Replace the ``OFA_PAIR`` candidates of ``mixed_op`` (a ``MixedOp``) by elastic ones
    sharing the large candidate's convolution weight and batch norm (in place), and
    plan the edge again."""
    names = list(mixed_op.primitives)
    missing = [name for name in OFA_PAIR if name not in names]
    if missing:
        raise ValueError(f"the OFA kernel transformation shares {' and '.join(OFA_PAIR)}; this edge lacks {missing}")
    small, large = (names.index(name) for name in OFA_PAIR)
    act, conv, bn = mixed_op.ops[large].op
    kernel = ElasticKernel(conv.weight, (mixed_op.ops[small].op[1].kernel_size[0], conv.kernel_size[0]))
    stride = conv.stride[0]
    mixed_op.ops[small] = ElasticReLUConvBN(act, kernel, kernel.sizes[0], bn, stride)
    mixed_op.ops[large] = ElasticReLUConvBN(act, kernel, kernel.sizes[-1], bn, stride)
    mixed_op.replan()


def layer_drop_probability(rate: float, index: int, layers: int) -> float:
    """The study's path dropout of the ``index``-th of ``layers`` cells (``apply_drop_path``)."""
    return rate * (index + 1) / layers
