# Search cells in the style of xautodl/models/cell_searchs/search_cells.py.
import random
from copy import deepcopy

import torch
import torch.nn as nn

from .cell_operations import OPS


class NAS201SearchCell(nn.Module):
    """The NAS-Bench-201 cell: a complete DAG over max_nodes nodes, every edge all candidates."""

    def __init__(self, C_in, C_out, stride, max_nodes, op_names, affine=False, track_running_stats=True):
        super(NAS201SearchCell, self).__init__()
        self.op_names = deepcopy(op_names)
        self.edges = nn.ModuleDict()
        self.max_nodes = max_nodes
        self.in_dim = C_in
        self.out_dim = C_out
        for i in range(1, max_nodes):
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                edge_stride = stride if j == 0 else 1
                self.edges[node_str] = nn.ModuleList(
                    [OPS[name](C_in, C_out, edge_stride, affine, track_running_stats) for name in op_names]
                )
        self.edge_keys = sorted(list(self.edges.keys()))
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    def forward(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(sum(layer(nodes[j]) * w for layer, w in zip(self.edges[node_str], weights)))
            nodes.append(sum(inter_nodes))
        return nodes[-1]

    # GDAS: each edge runs its sampled candidate only; the other hard weights
    # (zero in value) are still added, so that they receive a gradient.
    def forward_gdas(self, inputs, hardwts, index):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = hardwts[self.edge2index[node_str]]
                argmaxs = index[self.edge2index[node_str]].item()
                weigsum = sum(
                    weights[_ie] * edge(nodes[j]) if _ie == argmaxs else weights[_ie]
                    for _ie, edge in enumerate(self.edges[node_str])
                )
                inter_nodes.append(weigsum)
            nodes.append(sum(inter_nodes))
        return nodes[-1]

    # The same sum, as a second entry point.
    def forward_joint(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(sum(layer(nodes[j]) * w for layer, w in zip(self.edges[node_str], weights)))
            nodes.append(sum(inter_nodes))
        return nodes[-1]

    # One uniformly sampled candidate per edge (SETN); takes no weights.
    def forward_urs(self, inputs):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                inter_nodes.append(random.choice(self.edges[node_str])(nodes[j]))
            nodes.append(sum(inter_nodes))
        return nodes[-1]

    # The candidate of the largest weight on each edge: not a weighted sum.
    def forward_select(self, inputs, weightss):
        nodes = [inputs]
        for i in range(1, self.max_nodes):
            inter_nodes = []
            for j in range(i):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                inter_nodes.append(self.edges[node_str][weights.argmax().item()](nodes[j]))
            nodes.append(sum(inter_nodes))
        return nodes[-1]


class MixedOp(nn.Module):
    def __init__(self, space, C, stride, affine, track_running_stats):
        super(MixedOp, self).__init__()
        self._ops = nn.ModuleList()
        for primitive in space:
            self._ops.append(OPS[primitive](C, C, stride, affine, track_running_stats))

    def forward_gdas(self, x, weights, index):
        return self._ops[index](x) * weights[index]

    def forward_darts(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class NASNetSearchCell(nn.Module):
    """A DARTS (NASNet-space) cell whose mixed ops sum in forward_darts and sample in forward_gdas."""

    def __init__(
        self, space, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, affine, track_running_stats
    ):
        super(NASNetSearchCell, self).__init__()
        self.reduction = reduction
        self.op_names = deepcopy(space)
        if reduction_prev:
            self.preprocess0 = OPS["skip_connect"](C_prev_prev, C, 2, affine, track_running_stats)
        else:
            self.preprocess0 = OPS["nor_conv_1x1"](C_prev_prev, C, 1, affine, track_running_stats)
        self.preprocess1 = OPS["nor_conv_1x1"](C_prev, C, 1, affine, track_running_stats)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        self.edges = nn.ModuleDict()
        for i in range(self._steps):
            for j in range(2 + i):
                node_str = "{:}<-{:}".format(i, j)  # the edge from node j to node i + 2
                stride = 2 if reduction and j < 2 else 1
                self.edges[node_str] = MixedOp(space, C, stride, affine, track_running_stats)
        self.edge_keys = sorted(list(self.edges.keys()))
        self.edge2index = {key: i for i, key in enumerate(self.edge_keys)}
        self.num_edges = len(self.edges)

    @property
    def multiplier(self):
        return self._multiplier

    def forward_gdas(self, s0, s1, weightss, indexs):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            clist = []
            for j, h in enumerate(states):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                index = indexs[self.edge2index[node_str]].item()
                clist.append(self.edges[node_str].forward_gdas(h, weights, index))
            states.append(sum(clist))
        return torch.cat(states[-self._multiplier :], dim=1)

    def forward_darts(self, s0, s1, weightss):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            clist = []
            for j, h in enumerate(states):
                node_str = "{:}<-{:}".format(i, j)
                weights = weightss[self.edge2index[node_str]]
                clist.append(self.edges[node_str].forward_darts(h, weights))
            states.append(sum(clist))
        return torch.cat(states[-self._multiplier :], dim=1)
