"""No import cycles among fxprune's modules.

The graph is read from the source with ``ast``: every ``import``/``from`` statement,
at module level or inside a function (a function-local import that only dodges a cycle
is still a cycle), relative imports resolved. Importing ``fxprune.a.b`` also runs the
package ``fxprune.a``'s ``__init__`` first, so an import adds an edge to each package
on the way that the importing module is not itself inside (``fxprune`` itself is
always imported first and is left out).
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import fxprune

ROOT = Path(fxprune.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fxprune modules that ``name`` (at ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    out = set()
    for target in targets:
        while target and target not in known:  # `import fxprune.a.b` names a module or its package
            target = target.rpartition(".")[0]
        if not target.startswith("fxprune"):
            continue
        out.add(target)
        parts = target.split(".")
        for i in range(2, len(parts)):  # the packages whose __init__ runs on the way
            parent = ".".join(parts[:i])
            if not (name == parent or name.startswith(parent + ".")):
                out.add(parent)
    out.discard(name)
    return out


def import_graph() -> nx.DiGraph:
    known = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in known.items():
        graph.add_edges_from((name, target) for target in imported(name, path, known))
    return graph


def test_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert graph.has_edge("fxprune", "fxprune.compress")              # relative, module level
    assert graph.has_edge("fxprune.cli.commands", "fxprune.demo")     # inside a function
    assert graph.has_edge("fxprune.cli", "fxprune.cli.commands")


def test_no_import_cycles():
    cycles = []
    for cycle in nx.simple_cycles(import_graph()):
        start = cycle.index(min(cycle))  # a stable rotation, in import order
        cycles.append(cycle[start:] + cycle[:start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in sorted(cycles))
