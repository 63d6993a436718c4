"""Output writers: atomic chunks, resume after a cut-off write, no duplicate ids, Parquet parts."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from minicpmv.batch.output import FIELDS, JsonlWriter, ParquetWriter, open_output, read_output
from minicpmv.errors import InputError


def rec(i: int, error: str | None = None) -> dict:
    return {"id": f"r{i}", "answer": None if error else f"answer {i} ü", "reasoning": None,
            "prompt_tokens": None if error else 10 + i, "completion_tokens": None if error else i,
            "finish_reason": None if error else "stop", "error": error}


def test_jsonl_chunks_resume_and_no_duplicates(tmp_path):
    out = tmp_path / "out.jsonl"
    w = open_output(out)
    assert isinstance(w, JsonlWriter) and w.done == set()
    assert w.write([rec(0), rec(1, "ImageError: bad")]) == 2
    assert w.write([rec(1), rec(2)]) == 1  # r1 is already written: dropped
    assert (w.written, w.failed, w.duplicates) == (3, 1, 1)
    assert read_output(out) == [rec(0), rec(1, "ImageError: bad"), rec(2)]
    again = open_output(out)
    assert again.done == {"r0", "r1", "r2"}
    assert again.write([rec(2), rec(3)]) == 1
    assert [r["id"] for r in read_output(out)] == ["r0", "r1", "r2", "r3"]


def test_jsonl_partial_last_line_is_cut_off_and_redone(tmp_path):
    out = tmp_path / "out.jsonl"
    good = json.dumps(rec(0)) + "\n"
    out.write_text(good + json.dumps(rec(1))[:17], encoding="utf-8")  # killed in the middle of a write
    w = open_output(out)
    assert w.done == {"r0"}
    assert out.read_text(encoding="utf-8") == good
    w.write([rec(1)])
    assert read_output(out) == [rec(0), rec(1)]


@pytest.mark.parametrize("content", ['{"id": "a"}\nnot json\n', '{"answer": "no id"}\n', "[1]\n"])
def test_a_file_that_is_not_batch_output_is_refused(tmp_path, content):
    out = tmp_path / "notes.jsonl"
    out.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="does not look like the output"):
        open_output(out)
    assert out.read_text(encoding="utf-8") == content  # untouched


def test_output_names_are_checked(tmp_path):
    with pytest.raises(InputError, match=".jsonl or .parquet"):
        open_output(tmp_path / "out.csv")
    with pytest.raises(InputError, match="does not exist"):
        open_output(tmp_path / "no" / "out.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        open_output(tmp_path)


def test_parquet_parts_then_one_file(tmp_path):
    out = tmp_path / "out.parquet"
    w = open_output(out)
    assert isinstance(w, ParquetWriter)
    w.write([rec(0), rec(1, "VideoError: x")])
    w.write([rec(2)])
    parts = sorted(p.name for p in (tmp_path / "out.parquet.parts").iterdir())
    assert parts == ["part-000000.parquet", "part-000001.parquet"] and not out.exists()
    resumed = open_output(out)  # a second process after a kill: it sees the parts
    assert resumed.done == {"r0", "r1", "r2"}
    resumed.write([rec(1), rec(3)])
    resumed.close()
    assert not (tmp_path / "out.parquet.parts").exists()
    table = pq.read_table(out)
    assert table.column_names == list(FIELDS)
    assert table.to_pylist() == [rec(0), rec(1, "VideoError: x"), rec(2), rec(3)]
    final = open_output(out)
    assert final.done == {"r0", "r1", "r2", "r3"}
    final.write([rec(4)])
    final.close()
    assert [r["id"] for r in pq.read_table(out).to_pylist()] == ["r0", "r1", "r2", "r3", "r4"]


def test_parquet_kill_between_merge_and_cleanup_counts_each_row_once(tmp_path):
    out = tmp_path / "out.parquet"
    w = open_output(out)
    w.write([rec(0), rec(1)])
    parts = tmp_path / "out.parquet.parts"
    saved = {p.name: p.read_bytes() for p in parts.iterdir()}
    w.close()
    parts.mkdir()  # as if the process died after the merge's rename, before the parts were removed
    for name, data in saved.items():
        (parts / name).write_bytes(data)
    (parts / "part-000001.tmp").write_bytes(b"half a part")
    again = open_output(out)
    assert again.done == {"r0", "r1"} and not (parts / "part-000001.tmp").exists()
    again.write([rec(2)])
    again.close()
    assert [r["id"] for r in pq.read_table(out).to_pylist()] == ["r0", "r1", "r2"]
