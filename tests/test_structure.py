"""The package's shape: no import cycle among its modules (imports inside functions count),
no module over 400 lines, and every mode table covering its enum."""

import ast
import pathlib

import pytest

from mythos_jax import modes
from mythos_jax.layers.recurrence import INJECTION_CLASSES
from mythos_jax.moe.dispatch import STRATEGIES

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mythos_jax"
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source. ``from pkg import
    name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_cycles():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("mode, table", [(modes.MoEImpl, STRATEGIES),
                                         (modes.Injection, INJECTION_CLASSES)])
def test_mode_tables_cover_their_enum(mode, table):
    assert set(table) == set(mode)


def test_modes_accept_their_names_and_name_the_field_otherwise():
    assert modes.LoopRemat.parse("full", "loop_remat") is modes.LoopRemat.FULL
    assert modes.LoopRemat.NONE.policy is None and modes.LoopRemat.DOTS.policy is not None
    with pytest.raises(ValueError, match=r"^loop_remat: must be one of \('dots', 'full', "
                                         r"'none'\), got 'some'$"):
        modes.LoopRemat.parse("some", "loop_remat")
    assert repr(modes.ExitRule.KL) == "'kl'" and modes.ExitRule.KL == "kl"
