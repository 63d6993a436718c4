"""Before/after in one run: a benchmark against two source trees, alternating, on one machine.

``--base REV`` is checked out into a temporary git worktree (removed afterwards); the other side
is this working tree. Each round runs the benchmark once per side (the side that goes first
alternates), so both see the same machine conditions. Every numeric figure of the benchmark's
JSON output is printed with both sides' medians, the after/before ratio, and the before side's own
spread across rounds (max/min - 1): a ratio inside that spread is within noise.

* ``chat``: each tree's own ``bench/bench_chat.py --json`` (its code and its API);
* ``serve``: this tree's ``bench/bench_serve.py --src TREE/src --json`` (the server runs the
  tree's code; the client is the same).

Arguments after ``--`` go to the benchmark. Examples:
  python bench/bench_ab.py --base HEAD~3 --rounds 3 chat
  python bench/bench_ab.py --base 2629687 --rounds 2 serve -- --clients 1 4 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_side(kind: str, tree: Path, extra: list[str], out: Path) -> dict[str, float]:
    if kind == "chat":
        cmd = [sys.executable, str(tree / "bench" / "bench_chat.py"), "--json", str(out), *extra]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "bench_serve.py"), "--src", str(tree / "src"),
               "--json", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision of the 'before' side")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("kind", choices=["chat", "serve"])
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="-- arguments of the benchmark")
    args = ap.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], check=True,
                         capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), rev], check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = [("before", base), ("after", ROOT)]
                for side, tree in order if r % 2 == 0 else order[::-1]:
                    print(f"round {r + 1}/{args.rounds}: {side} ({rev if side == 'before' else 'working tree'})",
                          flush=True)
                    runs[side].append(run_side(args.kind, tree, extra, Path(tmp) / f"{side}-{r}.json"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    report(runs, rev)


def report(runs: dict[str, list[dict[str, float]]], rev: str) -> None:
    keys = [k for k in runs["before"][0] if all(k in r for side in runs.values() for r in side)]
    print(f"\n{'figure':<28} {'before ' + rev:>16} {'after':>12} {'after/before':>13} {'before spread':>14}")
    for k in keys:
        b = [r[k] for r in runs["before"]]
        a = [r[k] for r in runs["after"]]
        mb, ma = statistics.median(b), statistics.median(a)
        spread = (max(b) / min(b) - 1) if min(b) > 0 else float("nan")
        ratio = ma / mb if mb else float("nan")
        print(f"{k:<28} {mb:>16.4g} {ma:>12.4g} {ratio:>13.3f} {spread:>13.1%}")
    print(f"\nrounds: {len(runs['before'])}; host cores {os.cpu_count()}")


if __name__ == "__main__":
    main()
