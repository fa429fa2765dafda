# Candidate operations in the style of xautodl/models/cell_operations.py.
import torch
import torch.nn as nn

__all__ = ["OPS", "NAS_BENCH_201", "DARTS_SPACE", "ResNetBasicblock"]


def _conv_op(kernel, padding, dilation):
    return lambda C_in, C_out, stride, affine, track: ReLUConvBN(
        C_in, C_out, kernel, (stride, stride), padding, dilation, affine, track
    )


def _sep_op(kernel, padding, dilation, dual):
    return lambda C_in, C_out, stride, affine, track: (DualSepConv if dual else SepConv)(
        C_in, C_out, kernel, (stride, stride), padding, dilation, affine, track
    )


def _skip(C_in, C_out, stride, affine, track):
    if stride == 1 and C_in == C_out:
        return Identity()
    return FactorizedReduce(C_in, C_out, stride, affine, track)


OPS = {
    "none": lambda C_in, C_out, stride, affine, track: Zero(C_in, C_out, stride),
    "avg_pool_3x3": lambda C_in, C_out, stride, affine, track: POOLING(C_in, C_out, stride, "avg", affine, track),
    "max_pool_3x3": lambda C_in, C_out, stride, affine, track: POOLING(C_in, C_out, stride, "max", affine, track),
    "nor_conv_7x7": _conv_op((7, 7), (3, 3), (1, 1)),
    "nor_conv_3x3": _conv_op((3, 3), (1, 1), (1, 1)),
    "nor_conv_1x1": _conv_op((1, 1), (0, 0), (1, 1)),
    "dua_sepc_3x3": _sep_op((3, 3), (1, 1), (1, 1), True),
    "dua_sepc_5x5": _sep_op((5, 5), (2, 2), (1, 1), True),
    "dil_sepc_3x3": _sep_op((3, 3), (2, 2), (2, 2), False),
    "dil_sepc_5x5": _sep_op((5, 5), (4, 4), (2, 2), False),
    "skip_connect": _skip,
}

NAS_BENCH_201 = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
DARTS_SPACE = [
    "none",
    "skip_connect",
    "dua_sepc_3x3",
    "dua_sepc_5x5",
    "dil_sepc_3x3",
    "dil_sepc_5x5",
    "avg_pool_3x3",
    "max_pool_3x3",
]


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine, track_running_stats=True):
        super(ReLUConvBN, self).__init__()
        # A bias only where the batch norm has no shift of its own.
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=not affine),
            nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats),
        )

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine, track_running_stats=True):
        super(SepConv, self).__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C_in, bias=False
            ),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=not affine),
            nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats),
        )

    def forward(self, x):
        return self.op(x)


class DualSepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine, track_running_stats=True):
        super(DualSepConv, self).__init__()
        self.op_a = SepConv(C_in, C_in, kernel_size, stride, padding, dilation, affine, track_running_stats)
        self.op_b = SepConv(C_in, C_out, kernel_size, 1, padding, dilation, affine, track_running_stats)

    def forward(self, x):
        return self.op_b(self.op_a(x))


class ResNetBasicblock(nn.Module):
    def __init__(self, inplanes, planes, stride, affine=True, track_running_stats=True):
        super(ResNetBasicblock, self).__init__()
        assert stride in (1, 2), "invalid stride {:}".format(stride)
        self.conv_a = ReLUConvBN(inplanes, planes, 3, stride, 1, 1, affine, track_running_stats)
        self.conv_b = ReLUConvBN(planes, planes, 3, 1, 1, 1, affine, track_running_stats)
        if stride == 2:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, padding=0, bias=False),
            )
        elif inplanes != planes:
            self.downsample = ReLUConvBN(inplanes, planes, 1, 1, 0, 1, affine, track_running_stats)
        else:
            self.downsample = None
        self.out_dim = planes

    def forward(self, inputs):
        out = self.conv_b(self.conv_a(inputs))
        residual = inputs if self.downsample is None else self.downsample(inputs)
        return residual + out


class POOLING(nn.Module):
    """A pool with no batch norm after it; a 1x1 convolution first when the channels change."""

    def __init__(self, C_in, C_out, stride, mode, affine=True, track_running_stats=True):
        super(POOLING, self).__init__()
        if C_in == C_out:
            self.preprocess = None
        else:
            self.preprocess = ReLUConvBN(C_in, C_out, 1, 1, 0, 1, affine, track_running_stats)
        if mode == "avg":
            self.op = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        elif mode == "max":
            self.op = nn.MaxPool2d(3, stride=stride, padding=1)
        else:
            raise ValueError("Invalid mode={:} in POOLING".format(mode))

    def forward(self, inputs):
        x = self.preprocess(inputs) if self.preprocess else inputs
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, C_in, C_out, stride):
        super(Zero, self).__init__()
        self.C_in = C_in
        self.C_out = C_out
        self.stride = stride
        self.is_zero = True

    def forward(self, x):
        if self.C_in == self.C_out:
            if self.stride == 1:
                return x.mul(0.0)
            return x[:, :, :: self.stride, :: self.stride].mul(0.0)
        shape = list(x.shape)
        shape[1] = self.C_out
        return x.new_zeros(shape, dtype=x.dtype, device=x.device)


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, stride, affine, track_running_stats):
        super(FactorizedReduce, self).__init__()
        self.stride = stride
        self.relu = nn.ReLU(inplace=False)
        if stride == 2:
            C_outs = [C_out // 2, C_out - C_out // 2]
            self.convs = nn.ModuleList(
                [nn.Conv2d(C_in, C_outs[i], 1, stride=stride, padding=0, bias=not affine) for i in range(2)]
            )
            # Pads one row and column at the far end, so odd sizes work too.
            self.pad = nn.ConstantPad2d((0, 1, 0, 1), 0)
        elif stride == 1:
            self.conv = nn.Conv2d(C_in, C_out, 1, stride=stride, padding=0, bias=not affine)
        else:
            raise ValueError("Invalid stride : {:}".format(stride))
        self.bn = nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats)

    def forward(self, x):
        if self.stride == 2:
            x = self.relu(x)
            y = self.pad(x)
            out = torch.cat([self.convs[0](x), self.convs[1](y[:, :, 1:, 1:])], dim=1)
        else:
            out = self.conv(x)
        return self.bn(out)
