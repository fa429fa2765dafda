"""Registering an op with torch.library and the backend registry, from its parts.

Every op file says what is particular to its op: the fake forward and backward
(which run its check function), ``setup_context`` and a backward maker
(``make_backward(backward_op)`` returns the autograd backward that calls
``backward_op``, the C++ or the Triton backward op), and its Triton custom ops.
``register_op`` does the rest, the same way for every op:

- the C++ op ``fastnas::<name>`` and its backward ``fastnas::<name>_backward``,
  where fastnas._C defines both schemas (a missing or older extension is no
  error: the op then has no C++ backend): their fakes, and the autograd of the
  forward built on the C++ backward;
- the Triton custom ops, given as defined: the same fakes (or their own) and
  the same autograd, built on the Triton backward op;
- the backends that implement the op (``fastnas.backends``): ``cpu`` and ``cuda``
  read from the dispatcher, ``triton`` where a Triton op is given, or those named.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastnas import backends


def register_op(
    name: str,
    fake: Callable,
    *,
    fake_backward: Callable | None = None,
    setup_context: Callable | None = None,
    make_backward: Callable | None = None,
    triton=None,
    triton_backward=None,
    triton_fakes: tuple[Callable, Callable | None] | None = None,
    python: Sequence[str] | None = None,
) -> frozenset[str]:
    """Register the op ``name`` from its parts; return the backends ('cpu', 'cuda') whose C++ kernels run it.

    ``fake`` (and ``fake_backward``, which also names the C++ schema
    ``<name>_backward``) are the fake implementations of the C++ op and, unless
    ``triton_fakes`` gives their own, of the Triton ops ``triton`` and
    ``triton_backward`` (``torch.library.custom_op`` objects). With
    ``make_backward`` and ``setup_context`` the forward ops get their autograd;
    without, they have none here (forward-only ops, or a C++ autograd). ``python``
    names the backends that implement the op from Python (default: ``triton``
    where a Triton op is given). Nothing here raises when fastnas._C is missing:
    the result is then empty.
    """
    autograd = make_backward is not None
    if autograd and (fake_backward is None or setup_context is None):
        raise ValueError(f"register_op({name!r}): an autograd needs fake_backward and setup_context")
    cpp = _register_cpp(name, fake, fake_backward, setup_context, make_backward)
    if triton is not None:
        fake_t, fake_backward_t = triton_fakes or (fake, fake_backward)
        triton.register_fake(fake_t)
        if triton_backward is not None:
            triton_backward.register_fake(fake_backward_t)
        if autograd:
            triton.register_autograd(make_backward(triton_backward), setup_context=setup_context)
    python = ("triton",) if python is None and triton is not None else (python or ())
    if python:
        backends.register(name, *python)
    return cpp


def _register_cpp(name, fake, fake_backward, setup_context, make_backward) -> frozenset[str]:
    backward = f"{name}_backward"
    if not backends.register_cpp(name, *((backward,) if fake_backward is not None else ())):
        return frozenset()
    torch.library.register_fake(f"fastnas::{name}")(fake)
    if fake_backward is not None:
        torch.library.register_fake(f"fastnas::{backward}")(fake_backward)
    if make_backward is not None:
        torch.library.register_autograd(
            f"fastnas::{name}", make_backward(getattr(torch.ops.fastnas, backward)), setup_context=setup_context
        )
    return backends.cpp_backends(name)
