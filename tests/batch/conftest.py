"""Fixtures of the batch tests: a mixed media folder, a Parquet table, and one small local Ray
instance shared by every Ray test of the session (4 logical CPUs on this 2-core machine, a
400 MB object store, no dashboard; shut down when the session ends)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY26 = ROOT / "tests" / "data" / "conformance" / "2.6" / "_checkpoint"
TINY45 = ROOT / "tests" / "data" / "conformance" / "4.5" / "_checkpoint"
RAY_CPUS = 4
GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


def random_png(path: Path, seed: int, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_mixed_folder(root: Path) -> Path:
    """3 images (one in a subfolder), a video, a truncated PNG (corrupt), a text file named .jpg
    (not an image), a text file (not a row) and a hidden file."""
    from video.conftest import write_video  # tests/ is on sys.path: tests/batch and tests/video are packages

    random_png(root / "a.png", 1, (64, 48))
    random_png(root / "b.png", 2, (120, 90))
    random_png(root / "sub" / "c.png", 3, (300, 200))
    write_video(root / "clip.mp4", 12, 4)
    png = (root / "a.png").read_bytes()
    (root / "corrupt.png").write_bytes(png[: len(png) // 2])
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory) -> Path:
    return make_mixed_folder(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="session")
def parquet_table(tmp_path_factory) -> Path:
    """A Parquet table: images by relative path, a text-only row, per-row settings, a bad row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("table")
    for i in range(4):
        random_png(root / "img" / f"{i}.png", 10 + i, (50 + 20 * i, 40 + 10 * i))
    rows = [
        {"id": "r0", "image": "img/0.png", "prompt": "What is this?", "max_new_tokens": None},
        {"id": "r1", "image": "img/1.png", "prompt": None, "max_new_tokens": 5},
        {"id": "r2", "image": "img/2.png", "prompt": "Colours?", "max_new_tokens": 12},
        {"id": "r3", "image": None, "prompt": "Say hello.", "max_new_tokens": None},
        {"id": "r4", "image": "img/missing.png", "prompt": "Where?", "max_new_tokens": None},
        {"id": "r5", "image": "img/3.png", "prompt": "And this?", "max_new_tokens": None},
    ]
    path = root / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def ray_instance():
    """A private local Ray instance for the whole session (Ray tests share it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=RAY_CPUS, object_store_memory=400 * 2**20, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()



def greedy_job(input_path, output_path, model=TINY26, **kw):
    """A greedy, float32 job of the tiny checkpoint (no progress bar)."""
    from minicpmv.batch.job import BatchJob

    kw.setdefault("defaults", dict(GREEDY))
    return BatchJob(model=str(model), input=str(input_path), output=str(output_path), dtype="float32",
                    progress=False, **kw)


def by_id(records: list[dict]) -> dict[str, dict]:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids in the output: {sorted(ids)}"
    return {r["id"]: r for r in records}


@pytest.fixture(scope="session")
def local_mixed(mixed_folder, tmp_path_factory) -> dict[str, dict]:
    """The local runner's records for the mixed folder (the reference of the Ray runs)."""
    from minicpmv.batch.output import read_output
    from minicpmv.batch.runner import run_batch

    out = tmp_path_factory.mktemp("local_mixed") / "out.jsonl"
    run_batch(greedy_job(mixed_folder, out))
    return by_id(read_output(out))


@pytest.fixture(scope="session")
def local_table(parquet_table, tmp_path_factory) -> dict[str, dict]:
    """The local runner's records for the Parquet table, written as Parquet."""
    from minicpmv.batch.output import read_output
    from minicpmv.batch.runner import run_batch

    out = tmp_path_factory.mktemp("local_table") / "out.parquet"
    run_batch(greedy_job(parquet_table, out, prompt="Describe it."))
    return by_id(read_output(out))
