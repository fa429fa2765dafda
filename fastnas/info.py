"""``python -m fastnas.info``: which backends work here, versions, why any does not,
and which backend runs each op."""

from __future__ import annotations

import platform
import sys

import torch

from fastnas import backends
from fastnas._version import __version__


def _version_of(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def collect() -> dict:
    """Everything the table shows, as a dict (also handy in bug reports)."""
    import fastnas.ops  # noqa: F401  (importing the ops registers their implementations)

    C = backends.extension()
    build = C.build_info() if C is not None else {}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "fastnas": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "CPU-only build",
        "triton": _version_of("triton"),
        "GPU": gpu,
        "extension built with CUDA": str(build.get("cuda", "n/a")),
        "extension built against torch": build.get("torch_version", "n/a"),
        "TRITON_INTERPRET": "on" if backends.triton_interpret() else "off",
        "backends": backends.backend_status(),
        "ops": {op: backends.implementations(op) for op in backends.registered_ops()},
    }


def main(argv: list[str] | None = None) -> int:
    info = collect()
    status = info.pop("backends")
    ops = info.pop("ops")
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print()
    print(f"{'backend':<10}  {'available':<9}  reason")
    for name, why in status.items():
        print(f"{name:<10}  {'yes' if not why else 'no':<9}  {why}")
    print(f"\nrequested (FASTNAS_BACKEND or default): {backends.requested_backend()}\n")
    width = max(len(op) for op in ops)
    print(f"{'op':<{width}}  {'implemented by':<32}  {'runs cpu tensors':<16}  runs cuda tensors")
    for op, names in ops.items():
        used = [_used(op, device) for device in ("cpu", "cuda")]
        print(f"{op:<{width}}  {', '.join(names):<32}  {used[0]:<16}  {used[1]}")
    return 0


def _used(op: str, device: str) -> str:
    try:
        return backends.resolve(op, device)
    except (RuntimeError, ValueError) as exc:
        return f"none ({exc})"


if __name__ == "__main__":
    sys.exit(main())
