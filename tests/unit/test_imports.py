"""The trainer's import graph: no cycles (function-level imports included), the parallel
engine never reaches back into the training loop, and every module imports on its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "trainer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every trainer module ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from pkg import mod`` imports the module pkg.mod when there is one
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_function_level_imports():
    # launch.py imports the loop at module level, train.py's summary helpers import
    # trainer.parallel.pipeline inside a function: both edges must be in the graph.
    assert "trainer.train" in GRAPH["trainer.launch"]
    assert "trainer.parallel.pipeline" in GRAPH["trainer.train"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_parallel_never_imports_the_training_loop():
    offenders = {
        name: sorted(deps & {"trainer.train", "trainer.launch"})
        for name, deps in GRAPH.items()
        if name.startswith("trainer.parallel") and deps & {"trainer.train", "trainer.launch"}
    }
    assert offenders == {}


def test_torch_free_modules_stay_torch_free():
    # The control plane validates job specs with these without installing a model.
    for name in ("trainer.config", "trainer.errors", "trainer.atomic"):
        assert all(not d.startswith("trainer.") or d in {"trainer.errors"} for d in GRAPH[name])
        source = MODULES[name].read_text()
        assert "import torch" not in source, name


@pytest.mark.timeout(300)
def test_every_module_imports_on_its_own():
    # One interpreter (torch loads once); every trainer module is forgotten before the next
    # import, so each one is imported with nothing of the trainer loaded before it.
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'trainer']:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        print(f'{name}: {type(exc).__name__}: {exc}')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=280
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == ""
