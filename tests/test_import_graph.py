"""elastic_jax's modules import each other without cycles, and only at module level.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every
module-level ``import`` / ``from ... import`` in ``a`` that names module ``b`` of the package.
Implicit parent-package imports (importing ``p.q.r`` runs ``p/__init__`` first) are not edges:
Python handles those, and they would make every package ``__init__`` look cyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "elastic_jax"
ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every ``.py`` file of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported: the module body, including its
    top-level ``if`` / ``try`` blocks, but not ``if TYPE_CHECKING:`` blocks or function bodies."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    visit(block)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return found


def _function_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements inside function bodies (run at call time)."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.extend(n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, names) -> set[str]:
    """The package modules one import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        return {b for b in bases if b in names}
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in names:  # `from pkg import submodule`
            out.add(sub)
        elif base in names:  # `from module import name`
            out.add(base)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: modules it imports at module level}, within ``package``."""
    names = module_names(root, package)
    graph = {}
    for module, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _module_level_imports(tree):
            edges |= _targets(node, module, is_package, names)
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_elastic_jax_has_no_import_cycles():
    graph = import_graph(ROOT, PACKAGE)
    assert "elastic_jax.config" in graph and "elastic_jax.errors" in graph["elastic_jax.config"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_local_imports_of_elastic_jax_modules():
    """Function-local imports inside elastic_jax are kept only for heavy or optional third-party
    packages (torch, matplotlib, orbax, ...) and for pallas_kernels (its Pallas/Mosaic GPU
    modules load only when attention runs); never for elastic_jax's own modules."""
    offenders = []
    for path in module_names(ROOT, PACKAGE).values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _function_level_imports(tree):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [("." * node.level) + (node.module or "")]
            )
            if any(m.startswith(PACKAGE) or m.startswith(".") for m in mods):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"function-local imports of elastic_jax modules: {sorted(set(offenders))}"


def test_cycle_finder_reports_a_cycle(tmp_path):
    """The checker itself: a package whose modules import each other is reported."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text(
        "import typing\nif typing.TYPE_CHECKING:\n    from pkg import d\nfrom ..a import x\n"
    )
    (pkg / "d.py").write_text("def f():\n    from pkg import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}  # the TYPE_CHECKING import is not an edge
    assert graph["pkg.d"] == set()  # neither is a function-local one
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
