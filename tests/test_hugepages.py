"""Importing minicpmv turns on PyTorch's 2 MB pages for large CPU tensors, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import os, minicpmv, torch
a = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MB, touched
huge = open("/proc/self/smaps_rollup").read().split("AnonHugePages:")[1].split()[0]
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), int(huge))
"""


def _run(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    flag, huge = out.split()
    return flag, int(huge)


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "absent"


def test_large_tensors_get_huge_pages_unless_the_user_said_no() -> None:
    flag, huge = _run(None)
    assert flag == "1"
    off_flag, off_huge = _run("0")
    assert off_flag == "0"
    if _thp_mode() == "madvise":  # the kernel gives 2 MB pages only where asked: the switch decides
        assert huge > 0 and off_huge == 0
