"""The package's imports follow docs/architecture.md ("Layers"): the module import graph, lazy imports inside
functions included, has no cycle; every module is one row of the layers table and imports only modules of the
rows above it; training imports no evaluation, report or plotting code. Read with `ast`, nothing is imported.

An import of `alphaflow.x.y` is an edge to that module only: that Python runs the package's `__init__` first is
not counted (a package's `__init__` imports its submodules, so its row comes after theirs)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alphaflow"


def module_name(path, package=PACKAGE):
    """alphaflow/data/latents.py → alphaflow.data.latents, alphaflow/data/__init__.py → alphaflow.data."""
    parts = Path(path).relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(name, path, modules):
    """The modules of `modules` that the file `path` (module `name`) imports anywhere in it; `from p import x`
    names p.x where that is a module, else p."""
    package = name if Path(path).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # alphaflow.models.dit.DiT → alphaflow.models.dit; torch → ""
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package=PACKAGE):
    """{module: the package's modules it imports}."""
    modules = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph):
    """One import cycle [a, b, …, a] of `graph`, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def reachable(graph, start):
    """Every module that importing `start` imports, directly or not."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def table_modules():
    """The modules of the layers table's rows, top to bottom (its column of alphaflow/-relative paths)."""
    section = (ROOT / "docs" / "architecture.md").read_text().split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    return [module_name(PACKAGE / path) for path in re.findall(r"^\|[^|]*\| `([\w/]+\.py)` \|", section, re.M)]


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # fmt: off
    assert "alphaflow.features" in graph["alphaflow.metrics"]    # a top-level import
    assert "alphaflow.stages" in graph["alphaflow.cli"]          # a lazy one, inside a function
    # fmt: on
    assert {"alphaflow.features.inception", "alphaflow.features.vit"} <= graph["alphaflow.features"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_a_cycle_through_a_lazy_relative_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({**graph, "pkg.b": set()}) is None


def test_each_module_imports_only_the_rows_above_it_in_the_layers_table():
    graph, rows = import_graph(), table_modules()
    assert len(rows) == len(set(rows)), "a module has two rows"
    assert sorted(rows) == sorted(graph), (
        f"not in the table: {sorted(set(graph) - set(rows))}; not a module: {sorted(set(rows) - set(graph))}"
    )
    rank = {name: i for i, name in enumerate(rows)}
    upward = sorted(f"{m} imports {d}" for m in graph for d in graph[m] if rank[d] > rank[m])
    assert not upward, "imports of a module in a row below: " + "; ".join(upward)


def test_training_imports_no_evaluation_report_or_plotting_code():
    deps = reachable(import_graph(), "alphaflow.train")
    assert "alphaflow.models" in deps and "alphaflow.tracking" in deps
    banned = sorted(
        m
        for m in deps
        if m in ("alphaflow.evaluate", "alphaflow.plots", "alphaflow.report") or m.startswith("alphaflow.report.")
    )
    assert not banned, f"alphaflow.train imports {banned}"
