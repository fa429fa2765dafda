# Search networks in the style of xautodl/models/cell_searchs/search_model_{darts,gdas,darts_nasnet,gdas_nasnet}.py.
import torch
import torch.nn as nn

from .cell_operations import ResNetBasicblock
from .search_cells import NAS201SearchCell, NASNetSearchCell


def gumbel_hard(alphas, tau):
    """GDAS' straight-through sample: one-hot in value, the softmax's gradient."""
    while True:
        gumbels = -torch.empty_like(alphas).exponential_().log()
        probs = nn.functional.softmax((alphas.log_softmax(dim=1) + gumbels) / tau, dim=1)
        index = probs.max(-1, keepdim=True)[1]
        one_h = torch.zeros_like(probs).scatter_(-1, index, 1.0)
        hardwts = one_h - probs.detach() + probs
        if not (torch.isinf(gumbels).any() or torch.isinf(probs).any() or torch.isnan(probs).any()):
            return hardwts, index


class TinyNetwork(nn.Module):
    """NAS-Bench-201's search network: stem, three stages of N search cells, residual reductions."""

    def __init__(self, C, N, max_nodes, num_classes, search_space, affine=False, track_running_stats=True):
        super(TinyNetwork, self).__init__()
        self._C = C
        self.max_nodes = max_nodes
        self.stem = nn.Sequential(nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C))
        layer_channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        layer_reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev, num_edge, edge2index = C, None, None
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            if reduction:
                cell = ResNetBasicblock(C_prev, C_curr, 2)
            else:
                cell = NAS201SearchCell(C_prev, C_curr, 1, max_nodes, search_space, affine, track_running_stats)
                if num_edge is None:
                    num_edge, edge2index = cell.num_edges, cell.edge2index
                else:
                    assert num_edge == cell.num_edges and edge2index == cell.edge2index
            self.cells.append(cell)
            C_prev = cell.out_dim
        self.edge2index = edge2index
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.arch_parameters = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))

    def get_weights(self):
        return [p for name, p in self.named_parameters() if name != "arch_parameters"]

    def get_alphas(self):
        return [self.arch_parameters]

    def _head(self, feature):
        out = self.global_pooling(self.lastact(feature))
        out = out.view(out.size(0), -1)
        return out, self.classifier(out)


class TinyNetworkDarts(TinyNetwork):
    def forward(self, inputs):
        alphas = nn.functional.softmax(self.arch_parameters, dim=-1)
        feature = self.stem(inputs)
        for cell in self.cells:
            feature = cell(feature, alphas) if isinstance(cell, NAS201SearchCell) else cell(feature)
        return self._head(feature)


class TinyNetworkGDAS(TinyNetwork):
    tau = 10

    def forward(self, inputs):
        hardwts, index = gumbel_hard(self.arch_parameters, self.tau)
        feature = self.stem(inputs)
        for cell in self.cells:
            if isinstance(cell, NAS201SearchCell):
                feature = cell.forward_gdas(feature, hardwts, index)
            else:
                feature = cell(feature)
        return self._head(feature)


class NASNetwork(nn.Module):
    """The DARTS (NASNet) macro structure over NASNetSearchCell."""

    def __init__(
        self, C, N, steps, multiplier, stem_multiplier, num_classes, search_space, affine, track_running_stats
    ):
        super(NASNetwork, self).__init__()
        self._steps = steps
        self.stem = nn.Sequential(
            nn.Conv2d(3, C * stem_multiplier, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(C * stem_multiplier),
        )
        layer_channels = [C] * N + [C * 2] + [C * 2] * (N - 1) + [C * 4] + [C * 4] * (N - 1)
        layer_reductions = [False] * N + [True] + [False] * (N - 1) + [True] + [False] * (N - 1)
        C_prev_prev, C_prev, reduction_prev = C * stem_multiplier, C * stem_multiplier, False
        num_edge = None
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(layer_channels, layer_reductions):
            cell = NASNetSearchCell(
                search_space,
                steps,
                multiplier,
                C_prev_prev,
                C_prev,
                C_curr,
                reduction,
                reduction_prev,
                affine,
                track_running_stats,
            )
            num_edge = cell.num_edges
            self.cells.append(cell)
            C_prev_prev, C_prev, reduction_prev = C_prev, multiplier * C_curr, reduction
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.arch_normal_parameters = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))
        self.arch_reduce_parameters = nn.Parameter(1e-3 * torch.randn(num_edge, len(search_space)))

    def get_weights(self):
        return [p for name, p in self.named_parameters() if not name.startswith("arch_")]

    def get_alphas(self):
        return [self.arch_normal_parameters, self.arch_reduce_parameters]

    def _head(self, s1):
        out = self.global_pooling(self.lastact(s1))
        out = out.view(out.size(0), -1)
        return out, self.classifier(out)


class NASNetworkDARTS(NASNetwork):
    def forward(self, inputs):
        normal_w = nn.functional.softmax(self.arch_normal_parameters, dim=1)
        reduce_w = nn.functional.softmax(self.arch_reduce_parameters, dim=1)
        s0 = s1 = self.stem(inputs)
        for cell in self.cells:
            s0, s1 = s1, cell.forward_darts(s0, s1, reduce_w if cell.reduction else normal_w)
        return self._head(s1)


class NASNetworkGDAS(NASNetwork):
    tau = 10

    def forward(self, inputs):
        normal_hardwts, normal_index = gumbel_hard(self.arch_normal_parameters, self.tau)
        reduce_hardwts, reduce_index = gumbel_hard(self.arch_reduce_parameters, self.tau)
        s0 = s1 = self.stem(inputs)
        for cell in self.cells:
            if cell.reduction:
                hardwts, index = reduce_hardwts, reduce_index
            else:
                hardwts, index = normal_hardwts, normal_index
            s0, s1 = s1, cell.forward_gdas(s0, s1, hardwts, index)
        return self._head(s1)
