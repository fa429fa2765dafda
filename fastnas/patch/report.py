"""What ``fastnas.patch`` did: the report of one ``patch`` call and its warning.

The names of the styles it recognises and of what a replaced method computes live
here, at the bottom of the package, since the report speaks of both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DARTS = "darts"
PC_DARTS = "pc-darts"
NB201_CELL = "nb201-cell"
# What a replaced method computes (see the package docstring).
SUM = "sum"
NONZERO_SUM = "nonzero-sum"  # the sum over the candidates whose weight is not zero
GDAS_SUM = "gdas-sum"
ONE = "one"  # a GDAS hard sample that runs one candidate: recognised, never replaced
DESCRIBE = {
    SUM: "the weighted sum of its candidates",
    NONZERO_SUM: "the weighted sum of its candidates whose weight is not zero, the others not run",
    GDAS_SUM: "the GDAS hard-sample sum (the sampled candidate times its weight, plus the other weights)",
    ONE: "one sampled candidate times its weight",
}


class PatchWarning(UserWarning):
    """A mixed op or cell that ``fastnas.patch`` left unchanged."""


@dataclass(frozen=True)
class PatchedOp:
    """A patched module: its candidates (a cell's first edge), which methods now compute
    what (``sum`` or ``gdas-sum``), and how the weighted sum runs (``fused edge`` in
    training, or ``fused sum`` with the reason the fused edge does not take it)."""

    path: str
    style: str
    candidates: tuple[str, ...]
    skipped_zero: tuple[int, ...]
    methods: tuple[tuple[str, str], ...] = (("forward", SUM),)
    how: str = "fused edge"
    edges: int = 1
    notes: tuple[str, ...] = ()  # what was read by probing rather than off the module


@dataclass(frozen=True)
class SkippedOp:
    """A module (``method`` None) or one of its methods left unchanged, and why."""

    path: str
    reason: str
    method: str | None = None


@dataclass
class PatchReport:
    """What one ``patch`` call changed (``patched``), found already patched, and left alone.

    ``skipped``: modules left wholly unchanged (each also named in a ``PatchWarning``);
    ``methods_left``: methods of modules that look like a weighted sum by their
    signature but were not replaced, e.g. a GDAS method that runs one candidate.
    """

    backend: str | None
    patched: list[PatchedOp] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    skipped: list[SkippedOp] = field(default_factory=list)
    methods_left: list[SkippedOp] = field(default_factory=list)

    def __str__(self) -> str:
        cells = sum(op.style == NB201_CELL for op in self.patched)
        what = f"{len(self.patched) - cells} mixed ops" + (f" and {cells} cells" if cells else "")
        lines = [
            f"fastnas.patch (backend: {self.backend or 'auto'}): {what} patched, "
            f"{len(self.already_patched)} already patched, {len(self.skipped)} left unchanged"
        ]
        groups = Counter(
            (op.style, op.methods, op.how, op.edges, op.candidates, len(op.skipped_zero), op.notes)
            for op in self.patched
        )
        for (style, methods, how, edges, cands, zeros, notes), count in sorted(groups.items()):
            names = ", ".join(f"{name} ({what})" for name, what in methods)
            per = f" of {edges} edges" if style == NB201_CELL else ""
            note = f"; {zeros} zero candidate(s) not run" if zeros else ""
            note += "".join(f"; {n}" for n in notes)
            lines.append(f"  patched {count:4d} x {style}{per} {names}: [{', '.join(cands)}] via {how}{note}")
        for op in self.skipped:
            lines.append(f"  unchanged {op.path}: {op.reason}")
        for (method, reason), count in Counter((op.method, op.reason) for op in self.methods_left).items():
            lines.append(f"  not replaced {count:4d} x {method}: {reason}")
        return "\n".join(lines)
