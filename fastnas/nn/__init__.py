"""Supernet modules: candidate operations, mixed ops, cells."""

from fastnas.nn.cell import Cell, edge_endpoints, normalize_edge_weights, num_edges
from fastnas.nn.edge_plan import MEMORY_MODES, EdgePlan, plan_edge
from fastnas.nn.mixed_op import MixedOp, PartialChannelMixedOp
from fastnas.nn.operations import (
    OPS,
    DilConv,
    FactorizedReduce,
    Identity,
    ReLUConvBN,
    SepConv,
    Zero,
    check_primitives,
    register_primitive,
)
from fastnas.nn.supernet import SAMPLING_MODES, SuperNet, entropy, gumbel_softmax_hard

__all__ = [
    "MEMORY_MODES",
    "EdgePlan",
    "plan_edge",
    "OPS",
    "SAMPLING_MODES",
    "Cell",
    "DilConv",
    "FactorizedReduce",
    "Identity",
    "MixedOp",
    "PartialChannelMixedOp",
    "ReLUConvBN",
    "SepConv",
    "SuperNet",
    "Zero",
    "check_primitives",
    "edge_endpoints",
    "entropy",
    "gumbel_softmax_hard",
    "normalize_edge_weights",
    "num_edges",
    "register_primitive",
]
