"""Fused ops of fastnas, each with its eager reference (the oracle)."""

from fastnas.backends import available_backends, backend_status, use_backend
from fastnas.ops._common import MAX_INPUTS
from fastnas.ops.mixed_sum import mixed_sum, mixed_sum_reference
from fastnas.ops.partial_channel_mixed_sum import (
    channel_shuffle,
    partial_channel_mixed_sum,
    partial_channel_mixed_sum_reference,
)

__all__ = [
    "MAX_INPUTS",
    "available_backends",
    "backend_status",
    "channel_shuffle",
    "mixed_sum",
    "mixed_sum_reference",
    "partial_channel_mixed_sum",
    "partial_channel_mixed_sum_reference",
    "use_backend",
]
