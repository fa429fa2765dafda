"""fastnas: a fused-kernel supernet engine for weight-sharing neural architecture search."""

from fastnas._version import __version__
from fastnas import ops
from fastnas.ops import available_backends, use_backend

__all__ = ["__version__", "available_backends", "ops", "use_backend"]
