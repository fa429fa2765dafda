"""The layer rule: imports inside fastnas only go down, and no modules import each other in a circle.

A package (or top-level module) may import itself and the layers below it in
``LAYERS``, never one above or beside it; imports inside functions count too.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fastnas"

# Bottom to top. Search may cost an architecture on its evaluation network (train),
# never the other way; the tools use both; the command line uses everything.
LAYERS = [
    "_version",
    "errors",
    "_C",  # the compiled extension
    "kernels",  # the Triton kernels (kernels/ in the repository)
    "backends",
    "ops",
    "nn",
    "data",
    "spaces",
    "run",
    "train",
    "search",
    "tools",
    "patch",
    "bench",
    "info",
    "__init__",
    "cli",
    "__main__",
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> str:
    """The layer of ``fastnas.<layer>...``; the root package is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


OUTSIDE = ("fastnas._C", "fastnas.kernels")  # importable as fastnas.*, built or kept elsewhere


def _resolve(name: str, known: dict) -> str:
    """``fastnas.a.b.c`` where ``c`` may be a name inside module ``fastnas.a.b``."""
    for outside in OUTSIDE:
        if name == outside or name.startswith(outside + "."):
            return outside
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: pathlib.Path, known: dict, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {_resolve(n, known) for n in names if n == "fastnas" or n.startswith("fastnas.")}
    found.discard(module)
    return found


def test_every_package_is_in_a_layer():
    unknown = {_layer(m) for m in _modules()} - set(LAYERS)
    assert not unknown, f"add {sorted(unknown)} to LAYERS in tests/test_layers.py"


def test_imports_only_go_down():
    known = _modules()
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module, path in known.items():
        here = _layer(module)
        for target in _imports(module, path, known, top_level_only=False):
            there = _layer(target)
            if there != here and rank[there] >= rank[here]:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_modules():
    known = _modules()
    graph = {m: _imports(m, p, known, top_level_only=True) for m, p in known.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("bad", ["from fastnas.search import Searcher", "import fastnas.tools.selection"])
def test_the_rule_sees_an_upward_import(tmp_path, bad):
    """The checker itself: a module of the run layer importing search or tools is caught."""
    known = {**_modules(), "fastnas.run.probe": tmp_path / "probe.py"}
    (tmp_path / "probe.py").write_text(f"def f():\n    {bad}\n")
    targets = _imports("fastnas.run.probe", tmp_path / "probe.py", known, top_level_only=False)
    rank = {name: i for i, name in enumerate(LAYERS)}
    assert any(rank[_layer(t)] > rank["run"] for t in targets)
