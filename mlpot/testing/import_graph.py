"""mlpot's own import graph, read from the source: which module imports which, and its cycles.

A node is a module of the package (``mlpot.data.graph``; a package is its ``__init__``). There is
an edge ``a -> b`` when the source of ``a`` names ``b`` in an ``import`` or ``from ... import``
statement *anywhere* in the file, inside functions included: a deferred import only hides a
cycle until the function runs. Imports under ``if TYPE_CHECKING:`` are left out (they never
run). Importing a submodule also runs its parent packages' ``__init__``; those implicit edges
are left out too, else every package that re-exports its submodules would be a cycle.

A cycle is a strongly connected component of more than one module (Tarjan's algorithm).
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

__all__ = ["find_cycles", "import_graph", "package_modules"]


def package_modules(packages) -> dict[str, Path]:
    """Every module of the given packages -> its source file.

    ``packages`` lists every package by its full name (as ``pyproject.toml`` does; a package laid
    out elsewhere with ``package-dir``, such as ``mlpot.kernels``, is found where it is
    installed). Only each package's own folder is read; ``__main__`` modules are left out
    (importing one runs it).
    """
    modules: dict[str, Path] = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{package!r} is not an importable package")
        for folder in spec.submodule_search_locations:
            for path in sorted(Path(folder).glob("*.py")):
                if path.stem != "__main__":
                    modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _statements(tree: ast.AST):
    """Every statement of ``tree`` except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``modules`` that its source imports (see the module docstring)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps: set[str] = set()
        for node in _statements(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, path.name == "__init__.py", node)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        deps.add(full)
                    elif base in modules:
                        deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        # iterative Tarjan: (node, iterator over its successors)
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, succ = work[-1]
            for w in succ:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles
