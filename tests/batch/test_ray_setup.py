"""Ray stays optional: only ``batch/ray_setup.py`` imports it, importing the package never does,
and without it ``--ray`` gives a one-line error naming the extra to install."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from minicpmv.batch.ray_setup import import_ray, import_serve
from minicpmv.cli import main
from minicpmv.errors import FeatureNotAvailableError

from .conftest import TINY26

PKG = Path(__file__).resolve().parents[2] / "src" / "minicpmv"


def ray_importers(files: dict[str, str]) -> list[str]:
    """Names of the files (name -> source) that import ray, at any depth of the code."""
    out = []
    for name, source in files.items():
        for node in ast.walk(ast.parse(source)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(m == "ray" or m.startswith("ray.") for m in mods):
                out.append(name)
                break
    return out


def test_only_ray_setup_imports_ray():
    files = {str(p.relative_to(PKG)): p.read_text(encoding="utf-8") for p in PKG.rglob("*.py")}
    assert ray_importers(files) == ["batch/ray_setup.py"]
    assert ray_importers({"x.py": "def f():\n    from ray import serve\n", "y.py": "import rayon\n"}) == ["x.py"]


def test_importing_the_package_and_its_ray_modules_loads_no_ray():
    code = ("import sys, minicpmv.cli, minicpmv.batch.ray_data, minicpmv.batch.ray_serve, minicpmv.batch.job; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "False\n"


def test_without_ray_a_one_line_error_names_the_extra(monkeypatch, mixed_folder, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(FeatureNotAvailableError, match=r'pip install "minicpmv\[scale\]"'):
        import_ray()
    with pytest.raises(FeatureNotAvailableError, match=r'pip install "minicpmv\[scale\]"'):
        import_serve()
    out = tmp_path / "out.jsonl"
    rc = main(["batch", "-m", str(TINY26), "-i", str(mixed_folder), "-o", str(out), "--ray", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("minicpmv: error: Ray is not installed: pip install \"minicpmv[scale]\"")
    assert err.count("\n") == 1 and not out.exists()
    rc = main(["serve", "-m", str(TINY26), "--ray", "--replicas", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and 'pip install "minicpmv[scale]"' in err
