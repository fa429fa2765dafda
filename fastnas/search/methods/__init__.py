"""The search methods, by name. A new method is one file here and one line below."""

from __future__ import annotations

from fastnas.errors import SearchError
from fastnas.search.methods.amended_darts import AmendedDarts
from fastnas.search.methods.base import SearchMethod
from fastnas.search.methods.darts import Darts, DartsSecondOrder
from fastnas.search.methods.fairnas import FairNAS
from fastnas.search.methods.gdas import GDAS
from fastnas.search.methods.la_darts import LADarts
from fastnas.search.methods.oneshot import OneShot
from fastnas.search.methods.p_darts import PDarts
from fastnas.search.methods.pc_darts import PCDarts
from fastnas.search.methods.scalable_darts import ScalableDarts
from fastnas.search.methods.spos import SPOS

REGISTRY: dict[str, SearchMethod] = {
    method.name: method
    for method in (
        Darts(),
        DartsSecondOrder(),
        PCDarts(),
        PDarts(),
        GDAS(),
        AmendedDarts(),
        LADarts(),
        ScalableDarts(),
        SPOS(),
        FairNAS(),
        OneShot(),
    )
}
METHODS = tuple(REGISTRY)


def get_method(name: str) -> SearchMethod:
    """The method called ``name``; SearchError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise SearchError(f"unknown search method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "REGISTRY", "SearchMethod", "get_method"]
