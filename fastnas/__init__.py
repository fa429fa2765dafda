"""fastnas: a fused-kernel supernet engine for weight-sharing neural architecture search."""

from fastnas import ops
from fastnas._version import __version__
from fastnas.ops import available_backends, use_backend
from fastnas.patch import accelerate, patch, unpatch

__all__ = ["__version__", "accelerate", "available_backends", "ops", "patch", "unpatch", "use_backend"]
