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
    "errors": 0, "config": 0, "versions": 0,
    "processing": 1, "modeling": 2, "loading": 3, "engine": 4,
    "api": 5, "__init__": 5,
    "conformance": 6, "conformance_npz": 6, "cli": 6, "serve": 6, "ui": 6, "train": 6, "quant": 3,
    "demo_model": 1,
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
