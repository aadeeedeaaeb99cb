"""The layout's rules, read from the source: meshnode's layers import only downwards, the leaves beside
them import only what they are allowed, router/ and placement/ stay pure, and no module imports itself
back through others (TYPE_CHECKING imports count: a cycle in types is a cycle in design)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Top to bottom: a layer may import the layers after it and any leaf, never a layer before it.
LAYERS = ("__main__", "cli", "local", "node", "api", "control", "mesh", "serving", "state", "etcd")
# Beside the layers, each leaf with the only other parts of meshnode it may import.
LEAVES: dict[str, frozenset[str]] = {
    "settings": frozenset({"runtimes"}),
    "runtimes": frozenset({"errors", "net", "storage"}),
    "net": frozenset({"background", "errors"}),
    "storage": frozenset({"errors"}),
    "observability": frozenset(),
    "errors": frozenset(),
    "background": frozenset(),
}
PACKAGES = ("meshnode", "router", "placement")


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


MODULES = dict(_modules())


def _imports(module: str, path: Path) -> set[str]:
    """The project modules `module` imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            # `from a.b import c` names module a.b.c when c is one, else a.b.
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _part(module: str) -> str:
    """meshnode.serving.cache -> serving; meshnode.node -> node; router.router -> router."""
    parts = module.split(".")
    return parts[1] if parts[0] == "meshnode" and len(parts) > 1 else parts[0]


def _allowed(source: str, target: str) -> bool:
    if _part(source) == _part(target) or target.split(".")[0] != "meshnode":
        return True
    src, dst = _part(source), _part(target)
    if src in LEAVES:
        return dst in LEAVES[src]
    if dst in LEAVES:
        return True
    return src in LAYERS and dst in LAYERS and LAYERS.index(dst) > LAYERS.index(src)


def test_every_part_of_meshnode_is_placed() -> None:
    parts = {_part(m) for m in MODULES if m.startswith("meshnode.") and m != "meshnode.__main__"}
    assert parts <= set(LAYERS) | set(LEAVES)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("meshnode.")))
def test_meshnode_imports_only_downwards(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if not _allowed(module, t))
    assert upward == [], f"{module} imports {upward} against the layers (see meshnode/__init__.py)"


def test_router_and_placement_stay_pure() -> None:
    assert {m: t for m in MODULES if m.startswith("router") for t in GRAPH[m] if t.startswith("meshnode")} == {}
    assert {m: t for m in MODULES if m.startswith("placement") for t in GRAPH[m]
            if not t.startswith("placement")} == {}


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components over the module graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
