"""Fused ops of fastnas, each with its eager reference (the oracle)."""

from fastnas.backends import available_backends, backend_status, use_backend
from fastnas.ops._common import MAX_INPUTS
from fastnas.ops.darts_edge import EdgeSpec, darts_edge
from fastnas.ops.darts_sum import darts_sum, darts_sum_backward, pool_batch_norm_stats
from fastnas.ops.mixed_sum import mixed_sum, mixed_sum_reference
from fastnas.ops.multi_depthwise import multi_depthwise, multi_depthwise_backward
from fastnas.ops.partial_channel_mixed_sum import (
    channel_shuffle,
    partial_channel_mixed_sum,
    partial_channel_mixed_sum_reference,
)
from fastnas.ops.partial_channel_node import NodeSpec, partial_channel_node
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum
from fastnas.ops.relu_conv_bn import relu_conv_bn
from fastnas.ops.stacked_batch_norm import (
    stacked_batch_norm_backward,
    stacked_batch_norm_stats,
    update_running_stats,
)

__all__ = [
    "EdgeSpec",
    "MAX_INPUTS",
    "NodeSpec",
    "darts_edge",
    "darts_sum",
    "darts_sum_backward",
    "multi_depthwise",
    "multi_depthwise_backward",
    "partial_channel_node",
    "partial_channel_node_sum",
    "pool_batch_norm_stats",
    "relu_conv_bn",
    "stacked_batch_norm_backward",
    "stacked_batch_norm_stats",
    "update_running_stats",
    "available_backends",
    "backend_status",
    "channel_shuffle",
    "mixed_sum",
    "mixed_sum_reference",
    "partial_channel_mixed_sum",
    "partial_channel_mixed_sum_reference",
    "use_backend",
]
