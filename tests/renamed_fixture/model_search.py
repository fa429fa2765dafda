import torch
import torch.nn as nn
import torch.nn.functional as F

PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]


def _bn(C, affine, track):
    return nn.BatchNorm2d(C, affine=affine, track_running_stats=track)


class SepConv(nn.Module):
    def __init__(self, C, kernel_size, stride, padding, affine, track):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, kernel_size, stride, padding, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            _bn(C, affine, track),
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, kernel_size, 1, padding, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            _bn(C, affine, track),
        )

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, C, kernel_size, stride, padding, dilation, affine, track):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, kernel_size, stride, padding, dilation=dilation, groups=C, bias=False),
            nn.Conv2d(C, C, 1, bias=False),
            _bn(C, affine, track),
        )

    def forward(self, x):
        return self.op(x)


class FactorizedReduce(nn.Module):
    def __init__(self, C, affine, track):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C, C // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C, C - C // 2, 1, stride=2, bias=False)
        self.bn = _bn(C, affine, track)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


OPS = {
    "none": lambda C, stride, affine, track: Zero(stride),
    "max_pool_3x3": lambda C, stride, affine, track: nn.MaxPool2d(3, stride=stride, padding=1),
    "avg_pool_3x3": lambda C, stride, affine, track: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "skip_connect": lambda C, stride, affine, track: Identity() if stride == 1 else FactorizedReduce(C, affine, track),
    "sep_conv_3x3": lambda C, stride, affine, track: SepConv(C, 3, stride, 1, affine, track),
    "sep_conv_5x5": lambda C, stride, affine, track: SepConv(C, 5, stride, 2, affine, track),
    "dil_conv_3x3": lambda C, stride, affine, track: DilConv(C, 3, stride, 2, 2, affine, track),
    "dil_conv_5x5": lambda C, stride, affine, track: DilConv(C, 5, stride, 4, 2, affine, track),
}


def candidates(C, stride, pool_bn, affine, track):
    ops = []
    for primitive in PRIMITIVES:
        op = OPS[primitive](C, stride, affine, track)
        if pool_bn and "pool" in primitive:
            op = nn.Sequential(op, _bn(C, False, track))
        ops.append(op)
    return ops


class MixedOp(nn.Module):
    """Candidates under ``ops``, summed by a generator in forward."""

    def __init__(self, C, stride, pool_bn=True, affine=False, track=True):
        super().__init__()
        self.ops = nn.ModuleList(candidates(C, stride, pool_bn, affine, track))

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class MixedLayer(nn.Module):
    """Candidates under ``layers``, summed in a loop."""

    def __init__(self, C, stride, pool_bn=True, affine=False, track=True):
        super().__init__()
        self.layers = nn.ModuleList(candidates(C, stride, pool_bn, affine, track))

    def forward(self, x, weights):
        out = 0
        for i, layer in enumerate(self.layers):
            out = out + weights[i] * layer(x)
        return out


class MixedEdge(nn.Module):
    """Candidates under ``candidate_ops``, stacked and reduced."""

    def __init__(self, C, stride, pool_bn=True, affine=False, track=True):
        super().__init__()
        self.candidate_ops = nn.ModuleList(candidates(C, stride, pool_bn, affine, track))

    def forward(self, x, weights):
        outs = torch.stack([op(x) for op in self.candidate_ops])
        return (weights.view(-1, 1, 1, 1, 1) * outs).sum(0)


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C_in, C_out, 1, bias=False), nn.BatchNorm2d(C_out))

    def forward(self, x):
        return self.op(x)


class Cell(nn.Module):
    def __init__(self, mixed, steps, C_prev_prev, C_prev, C, reduction, reduction_prev, **options):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = nn.Sequential(nn.ReLU(), nn.Conv2d(C_prev_prev, C, 1, stride=2, bias=False))
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C)
        self.preprocess1 = ReLUConvBN(C_prev, C)
        self.steps = steps
        self.edges = nn.ModuleList(
            mixed(C, 2 if reduction and j < 2 else 1, **options) for i in range(steps) for j in range(2 + i)
        )

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            states.append(sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[2:], dim=1)


class Network(nn.Module):
    def __init__(self, C, num_classes, layers, criterion, mixed=MixedOp, steps=3, **options):
        super().__init__()
        self._criterion = criterion
        self.stem = nn.Sequential(nn.Conv2d(3, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
        C_prev_prev, C_prev, C_curr = 3 * C, 3 * C, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(Cell(mixed, steps, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, **options))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, steps * C_curr
        self.classifier = nn.Linear(C_prev, num_classes)
        edges = sum(2 + i for i in range(steps))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(edges, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(PRIMITIVES)))

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("alphas_")]

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            alphas = self.alphas_reduce if cell.reduction else self.alphas_normal
            s0, s1 = s1, cell(s0, s1, F.softmax(alphas, dim=-1))
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))
