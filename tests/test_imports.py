"""The package's modules import each other without a cycle, function-local imports too.

A cycle hidden behind an import inside a function still ties the modules together: each
needs the other to be understood, tested or replaced. Imports under `if TYPE_CHECKING:`
do not run and are left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "archived"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    walk(orelse)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    origin = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    origin = node.module or ""
                targets = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
            edges.update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in `graph` as the modules along it (the first repeated last), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_local_and_relative_imports() -> None:
    graph = import_graph()
    assert "archived.config" in graph["archived.jobfile"]
    assert "archived.drivers.base" in graph["archived.drivers"]
    assert "archived.fileio" in graph["archived.drivers.base"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def readme_layers() -> dict[str, int]:
    """Each module's layer in the README's "Layout of the code", counted from the bottom."""
    text = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Layout of the code") :]
    layers: dict[str, int] = {}
    level = -1
    for line in table.splitlines():
        if not line.startswith("| ") or line.startswith("| layer"):
            continue
        layer, modules, _ = (cell.strip() for cell in line.strip("|").split("|", 2))
        level += bool(layer)
        for name in re.findall(r"`([a-z_]+\.py|drivers/(?:[a-z_]+\.py)?)`", modules):
            dotted = name.removesuffix(".py").removesuffix("/").replace("/", ".")
            layers[f"archived.{dotted}"] = level
    return layers


def _layer(layers: dict[str, int], module: str) -> int | None:
    while module not in layers and module.count(".") > 1:
        module = module.rpartition(".")[0]  # a built-in driver: the layer of `drivers/`
    return layers.get(module)


def test_every_module_is_in_the_readme_and_imports_only_downwards() -> None:
    layers = readme_layers()
    graph = import_graph()
    missing = [m for m in graph if m != "archived" and _layer(layers, m) is None]
    assert not missing, f"not in the README's layout: {missing}"
    upwards = [
        f"{module} -> {imported}"
        for module, imports in graph.items()
        for imported in imports
        if module != "archived"
        and imported != "archived"
        and (_layer(layers, imported) or 0) > (_layer(layers, module) or 0)
    ]
    assert not upwards, f"imports from a higher layer: {upwards}"
