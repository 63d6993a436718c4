"""The package's own CPU decode kernels (``kernels.cpp``): built once per machine, then loaded.

``ops()`` compiles ``kernels.cpp`` with the system C++ compiler against the installed PyTorch the
first time it is asked for (about ten seconds), caches the library under
``$MINICPMV_CACHE`` (default ``~/.cache/minicpmv``) keyed by the source, PyTorch version, compiler
and CPU flags, loads it, and returns ``torch.ops.minicpmv_native``. Where the kernels cannot exist
(no AVX-512 BF16/VNNI, no compiler, ``MINICPMV_NATIVE=0``) it returns ``None`` once and logs why;
callers then use PyTorch's kernels. Nothing is downloaded and no code from user files is run.

This module does not decide which layer uses which kernel (``quant/linear.py`` does) and does not
check results (``linear.kernel_works`` compares every kernel with a reference before first use).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
_TIMEOUT_S = 600


def cache_dir() -> Path:
    """Where built kernels are kept (``$MINICPMV_CACHE`` or ``~/.cache/minicpmv``)."""
    root = os.environ.get("MINICPMV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minicpmv")
    return Path(root) / "kernels"


def cpu_signature() -> str:
    """The CPU model name and feature flags (what a measured choice about this machine depends on)."""
    return f"{_cpuinfo_value('model name')}|{' '.join(sorted(_cpu_flags()))}"


def _cpu_flags() -> set[str]:
    return set(_cpuinfo_value("flags").split())


def _cpuinfo_value(key: str) -> str:
    """The value of the first ``key`` line of /proc/cpuinfo ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return ""


def why_unavailable() -> str | None:
    """Why the native kernels cannot be used here, or None when they can be built."""
    if os.environ.get("MINICPMV_NATIVE", "1") == "0":
        return "MINICPMV_NATIVE=0"
    if not sys.platform.startswith("linux") or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return "not an x86-64 Linux CPU with AVX-512"
    missing = [f for f in NEEDED_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C++ compiler (set CXX or install g++)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    # -fopenmp: ATen's parallel_for is OpenMP in PyTorch's builds (without it the kernels run on one
    # thread); -ffp-contract=off: the dequantizers round like the float32 reference, no fused multiply-add
    return [_compiler() or "g++", "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++20",
            "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, f"-I{sysconfig.get_paths()['include']}",
            str(SOURCE), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}", "-o", str(out)]


def _key() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, " ".join(_command(Path("out.so"))), " ".join(sorted(_cpu_flags()))):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _build() -> Path:
    """Compile into the cache (atomically: concurrent builders each write a temporary file)."""
    target = cache_dir() / f"minicpmv_kernels-{_key()}.so"
    if target.exists():
        return target
    log.info("building minicpmv's CPU kernels (once per machine, about ten seconds)")

    def compile_to(tmp: Path) -> None:
        done = subprocess.run(_command(tmp), capture_output=True, text=True, timeout=_TIMEOUT_S)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or ["compiler failed"]
            raise RuntimeError(errors[0].strip())

    write_atomically(target, compile_to)
    return target


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Make ``target`` by ``write(tmp)`` on a temporary file beside it, then a rename: readers see
    the old file or the whole new one, concurrent writers each their own temporary file, and a
    failure (raised on) leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def ops() -> Any | None:
    """``torch.ops.minicpmv_native`` (built and loaded on first call), or None where unavailable."""
    why = why_unavailable()
    if why is None:
        try:
            torch.ops.load_library(str(_build()))
            return torch.ops.minicpmv_native
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            why = f"building them failed: {e}"
    log.info("minicpmv's native CPU kernels are not used (%s); PyTorch's kernels run instead", why)
    return None
