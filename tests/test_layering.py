"""The package's import graph: no cycle, and no import runs up a layer.

Read from the source with ``ast`` (every ``import`` statement, also those inside functions), so
a lazy import counts too. Layers, bottom to top: ``state`` < ``kernels`` < ``functional`` <
``optim`` < ``diagnostics`` < the applications (``bench``, ``tasks``, ``cli``). ``hparams`` and
``memory`` are leaves that import no layer. The back-compat shims (``lionopt.lion``,
``lionopt.variants``, the old ``lionopt.kernels.*`` names) sit in the layer they re-export.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lionopt"

LAYERS = {
    "state": 0,
    "kernels": 1,
    "functional": 2,
    "hparams": 0,
    "memory": 0,
    "optim": 3,
    "distributed": 3,
    "lion": 3,
    "variants": 3,
    "diagnostics": 4,
    "convert": 4,
    "integrations": 5,
    "bench": 5,
    "tasks": 5,
    "cli": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            # ``from package import submodule`` imports the submodule.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@cache
def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        graph[name] = {
            target
            for target in _imports(path, name)
            if target in paths and target != name and not name.startswith(target + ".")
        }
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "lionopt.kernels.cpu.dispatch" in graph["lionopt.optim.base"]
    assert "lionopt.state.int8" in graph["lionopt.kernels.reference"]


def test_no_import_cycle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_no_import_runs_up_a_layer() -> None:
    upward = []
    for module, targets in _graph().items():
        low = _layer(module)
        if low is None:
            continue
        for target in targets:
            high = _layer(target)
            if high is not None and high > low:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_kernels_and_state_never_import_optim_or_functional() -> None:
    for module, targets in _graph().items():
        if module.startswith(("lionopt.kernels", "lionopt.state")):
            bad = [t for t in targets if t.startswith(("lionopt.optim", "lionopt.functional"))]
            assert not bad, (module, bad)


def test_no_storage_sentinel_outside_state() -> None:
    """The 8-bit storage is recognised only by ``lionopt.state`` (and the C++ dispatch)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.startswith("lionopt.state"):
            continue
        text = path.read_text()
        if '"exp_avg_scale" in' in text or "== INT8" in text or '== "int8"' in text:
            offenders.append(name)
    assert not offenders, offenders


def test_the_functional_and_the_optimizers_never_name_a_backend_module() -> None:
    """Fused kernels are reached through ``kernels.registry``; only ``optim.base`` knows the
    CPU backend's ``GroupStepCache`` (its whole-group C++ step)."""
    for module, targets in _graph().items():
        if module == "lionopt.functional" or module.startswith("lionopt.optim"):
            named = [
                t
                for t in targets
                if t.startswith(("lionopt.kernels.cpu", "lionopt.kernels.triton"))
            ]
            allowed = {"lionopt.kernels.cpu.dispatch"} if module == "lionopt.optim.base" else set()
            assert set(named) <= allowed, (module, named)
