"""The shape of the package, from its source alone: the import graph and what crosses where.

- no import cycle anywhere in `hf_flower/` (imports inside functions count: they run too);
- `client/` and `server/` never import each other: what both need lives below them;
- nothing imports the package's root, whose `__init__` is the public API (it would close a cycle);
- at most 10 modules at the top of `hf_flower/`;
- a module's private names (`_x`) are not imported by other modules: what is shared is public;
- only `transport/flwr_compat.py` imports Flower's internal modules.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_flower"
ROOT = PACKAGE.name
# Flower's public modules (what its own examples import); anything else of flwr is internal.
FLOWER_PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.common.logger")
FLOWER_COMPAT = f"{ROOT}.transport.flwr_compat"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of module `name`."""
    path = MODULES[name]
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            found.append((target, [alias.name for alias in node.names], node.lineno))
    return found


def package_edges() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package that is one of
    its submodules counts as that submodule)."""
    edges = {}
    for name in MODULES:
        targets = set()
        for target, names, _ in imports_of(name):
            if not target.startswith(ROOT):
                continue
            for imported in names or [""]:
                module = f"{target}.{imported}" if f"{target}.{imported}" in MODULES else target
                while module not in MODULES:
                    module = module.rpartition(".")[0]
                if module != name:
                    targets.add(module)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(package_edges()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("side, other", [("client", "server"), ("server", "client")])
def test_client_and_server_never_import_each_other(side, other):
    edges = package_edges()
    crossings = [
        f"{module} -> {target}"
        for module, targets in edges.items()
        if module.startswith(f"{ROOT}.{side}")
        for target in targets
        if target.startswith(f"{ROOT}.{other}")
    ]
    assert crossings == []


def test_nothing_imports_the_public_api():
    importers = [
        module
        for module, targets in package_edges().items()
        if ROOT in targets and module != f"{ROOT}.__main__"
    ]
    assert importers == []


def test_at_most_ten_modules_at_the_top():
    top = sorted(
        path.name for path in PACKAGE.glob("*.py") if path.name not in ("__init__.py", "__main__.py")
    )
    assert len(top) <= 10, top


def test_private_names_stay_in_their_module():
    crossings = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, names, line in imports_of(module)
        if target.startswith(ROOT)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert crossings == []


def test_only_flwr_compat_imports_flower_internals():
    internal = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if module != FLOWER_COMPAT
        for target, _, line in imports_of(module)
        if target.split(".")[0] == "flwr" and not target.startswith(FLOWER_PUBLIC)
    ]
    assert internal == []
