"""Repository-wide checks: the layering rule of the architecture and a clean ruff run."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "minicpmv"

# Lower number = lower layer. A module may import only from its own rank or lower ones.
RANKS = {
    "errors": 0, "config": 0, "versions": 0, "checks": 0,
    "processing": 1, "modeling": 2, "loading": 3, "engine": 4,
    "api": 5, "__init__": 5, "formats": 3,
    "conformance": 6, "cli": 6, "serve": 6, "ui": 6, "train": 6, "quant": 3,
    "demo_model": 1, "batch": 6, "cli_speech": 6,
}


def _rank(module: str) -> int:
    top = module.split(".")[0]
    if top not in RANKS:
        raise AssertionError(f"module minicpmv.{module} has no layer in tests/test_repo.py RANKS")
    return RANKS[top]


def _imports(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(p for p in [*base, node.module or ""] if p)
                out.append(target)
            elif node.module and node.module.startswith("minicpmv."):
                out.append(node.module.removeprefix("minicpmv."))
        elif isinstance(node, ast.Import):
            out += [a.name.removeprefix("minicpmv.") for a in node.names if a.name.startswith("minicpmv.")]
    return [t for t in out if t]


def test_layering() -> None:
    violations = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        module = ".".join(rel.parts)
        if module == "__init__":
            continue  # the package facade re-exports lazily
        for target in _imports(path, module):
            if _rank(target) > _rank(module):
                violations.append(f"{module} imports {target}")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def _module_graph() -> dict[str, set[str]]:
    """minicpmv module -> the minicpmv modules it imports (top-level and function-level imports)."""
    modules = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        mod_name = module + ".__init__" if path.name == "__init__.py" else module
        targets = set()
        for target in _imports(path, mod_name):
            while target and target not in modules:  # `from .x import name` names a module or an attribute
                target = target.rpartition(".")[0]
            if target and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    """No two modules import each other, directly or through others (lazy imports count too).

    A package's ``__init__`` counts as its own module, so re-exporting from a submodule is fine
    as long as that submodule does not import the package back."""
    cycles = _cycles(_module_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_circle_check_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_processing_is_torch_free() -> None:
    for path in (PKG / "processing").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), f"{path} imports torch"


def test_import_is_cheap() -> None:
    code = "import sys, minicpmv; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is installed with the [dev] extra")
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
