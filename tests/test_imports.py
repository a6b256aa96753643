"""The shape of the code, read from its source with `ast` (nothing is imported): the import graph of the repo's own
packages (kd_core, flows, tasks) has no cycle, kd_core never reaches Prefect, and modules stay short enough to
read at once. Every import statement counts, at module level or inside a function (a deferred import is still a
dependency), and under `if TYPE_CHECKING:` too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kd_core", "flows", "tasks")
MAX_LINES = {"kd_core": 600, "tasks": 120}


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of PACKAGES (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `name` imports: repo modules by their dotted name, anything else by its top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import submodule` imports the submodule; `from module import name` the module.
            subs = {f"{base}.{alias.name}" for alias in node.names} & known.keys()
            out |= subs or {base}
    return {m if m in known else _known_prefix(m, known) or m.split(".")[0] for m in out}


def _known_prefix(dotted: str, known: dict[str, Path]) -> str | None:
    """The longest repo module that `dotted` names or lies in (`import kd_core.h5cache.format` -> that module)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or one that imports itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue  # not one of ours
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert {"kd_core.config", "kd_core.h5cache", "flows.cli"} <= edges.keys()  # the walk found the code
    assert cycles(edges) == []


def test_config_is_a_leaf():
    """Everyone needs the config: it needs none of the format, the demo, the teacher or torch."""
    reached = reachable(graph(), "kd_core.config")
    assert not reached & {"kd_core.h5cache", "kd_core.demo", "kd_core.teacher", "torch", "transformers"}, reached


def test_kd_core_never_reaches_prefect():
    """kd_core is importable without Prefect: none of its modules, through anything of ours they import, imports
    prefect, flows or tasks (which do)."""
    edges = graph()
    for name in (n for n in edges if n.split(".")[0] == "kd_core"):
        reached = reachable(edges, name) | edges[name]
        assert not reached & {"prefect", "flows", "tasks"}, name
        assert not {r for r in reached if r.startswith(("flows.", "tasks."))}, name


def test_modules_are_short():
    too_long = {}
    for name, path in modules().items():
        limit = MAX_LINES.get(name.split(".")[0])
        lines = len(path.read_text().splitlines())
        if limit is not None and lines > limit:
            too_long[name] = lines
    assert too_long == {}, f"over {MAX_LINES} lines"


def test_the_checks_catch_what_they_look_for():
    """The graph walk itself: a cycle through a deferred import, a relative import and a package import is found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "numpy"}, "d": {"a"}, "e": {"e"}}
    assert sorted(cycles(edges)) == [["a", "b", "c"], ["e"]]
    assert reachable(edges, "d") == {"a", "b", "c", "numpy"}
    source = ROOT / "kd_core" / "h5cache" / "writer.py"
    known = modules()
    assert {"kd_core.h5cache.format", "kd_core.h5cache.verify", "h5py"} <= imported("kd_core.h5cache.writer",
                                                                                     source, known)
