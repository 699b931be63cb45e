"""The package's layer rules and import graph, read from the source (every import, including those inside
functions): what docs/architecture.md draws, held by a test so that it stays true."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "megatron_gad"

# The import cycle left (issue 24: config.py, compat.py and config_checks.py become one `config/` package).
# Shrink this set when a cycle is removed; a new cycle fails the test.
KNOWN_CYCLES = [{"megatron_gad.compat", "megatron_gad.config", "megatron_gad.config_checks"}]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (``from a import b`` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for name in _imports(path):
            while name and name not in mods:  # a.b.func -> a.b
                name = name.rpartition(".")[0]
            # a module importing its own package's __init__ (or itself) is not an edge of interest
            if name and name != mod and not mod.startswith(name + "."):
                graph[mod].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(g) == [{"a", "b", "c"}]


def test_no_import_cycles_but_the_known_one():
    found = sorted(sorted(c) for c in _cycles(_graph()))
    assert found == sorted(sorted(c) for c in KNOWN_CYCLES), found


def _importers(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    return {m: names for m, names in ((m, _imports(p)) for m, p in _modules().items()) if m.startswith(prefixes)}


def test_algos_is_pure_torch():
    bad = {m: sorted(n for n in names if n.split(".")[0] in ("megatron", "ray")
                     or (n.startswith("megatron_gad") and not n.startswith("megatron_gad.algos")))
           for m, names in _importers(("megatron_gad.algos",)).items()}
    assert not {m: v for m, v in bad.items() if v}


def test_models_engine_kernels_do_not_import_upper_layers():
    upper = ("megatron_gad.controller", "megatron_gad.workers", "megatron_gad.tools", "megatron_gad.demo",
             "megatron_gad.cli")
    bad = {m: sorted(n for n in names if n.startswith(upper))
           for m, names in _importers(("megatron_gad.models", "megatron_gad.engine", "megatron_gad.kernels")).items()}
    assert not {m: v for m, v in bad.items() if v}


def test_only_parallel_uses_parallel_state():
    users = sorted(m for m, names in _importers(("megatron_gad",)).items()
                   if any("parallel_state" in n for n in names))
    assert users and all(m.startswith("megatron_gad.parallel") for m in users), users


def test_config_planner_and_slurm_import_without_torch():
    code = ("import sys; import megatron_gad.config, megatron_gad.compat, megatron_gad.config_checks, "
            "megatron_gad.planner, megatron_gad.tools.plan, megatron_gad.tools.slurm; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'ray', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
