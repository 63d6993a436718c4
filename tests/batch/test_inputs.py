"""Row discovery: folders, globs and JSONL/CSV/Parquet tables, per-row errors, whole-input errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minicpmv.batch.inputs import DEFAULT_IMAGE_PROMPT, DEFAULT_VIDEO_PROMPT, Row, discover
from minicpmv.errors import InputError

from .conftest import random_png


def test_folder_rows_are_relative_paths_of_images_and_videos(mixed_folder):
    found = discover(mixed_folder)
    assert [r.id for r in found.rows] == ["a.png", "b.png", "broken.jpg", "clip.mp4", "corrupt.png", "sub/c.png"]
    assert found.skipped_files == 1  # notes.txt (hidden files are not counted)
    by_id = {r.id: r for r in found.rows}
    assert by_id["clip.mp4"].media == ("video", str(mixed_folder / "clip.mp4"))
    assert by_id["sub/c.png"].media == ("image", str(mixed_folder / "sub" / "c.png"))
    assert by_id["a.png"].prompt == DEFAULT_IMAGE_PROMPT and by_id["clip.mp4"].prompt == DEFAULT_VIDEO_PROMPT
    assert all(r.error is None and r.settings == {} for r in found.rows)
    assert {r.prompt for r in discover(mixed_folder, default_prompt="Caption it.").rows} == {"Caption it."}


def test_glob_ids_are_relative_to_the_fixed_folders(mixed_folder):
    rows = discover(f"{mixed_folder}/**/*.png").rows
    assert [r.id for r in rows] == ["a.png", "b.png", "corrupt.png", "sub/c.png"]
    rows = discover(f"{mixed_folder}/sub/*").rows
    assert [(r.id, r.media[0]) for r in rows] == [("c.png", "image")]
    with pytest.raises(InputError, match="matches no file"):
        discover(f"{mixed_folder}/*.webp")


def test_jsonl_table_with_settings_and_bad_rows(tmp_path):
    random_png(tmp_path / "x.png", 0, (32, 32))
    lines = [
        {"id": 1, "image": "x.png", "prompt": "Q?", "max_new_tokens": 5, "temperature": 0, "enable_thinking": "true"},
        {"id": "t", "prompt": "text only", "label": "ignored column"},
        {"id": "u", "image": "https://example.com/a.png"},
        {"id": "s", "image": "x.png", "top_k": 1.5},
        {"id": "both", "image": "x.png", "video": "y.mp4"},
        {"id": "empty"},
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    rows = {r.id: r for r in discover(table).rows}
    assert rows["1"].media == ("image", str(tmp_path / "x.png")) and rows["1"].prompt == "Q?"
    assert rows["1"].settings == {"max_new_tokens": 5, "temperature": 0.0, "enable_thinking": True}
    assert rows["1"].error is None
    assert rows["t"].media is None and rows["t"].prompt == "text only" and rows["t"].error is None
    assert "URL" in rows["u"].error and rows["u"].media is None
    assert rows["s"].error == "top_k must be int, got 1.5"
    assert "not both" in rows["both"].error
    assert rows["empty"].error == "the row has no image, no video and no prompt"


def test_csv_and_parquet_tables_read_the_same_rows(tmp_path):
    recs = [{"id": "a", "image": "i.png", "prompt": "P", "max_new_tokens": 7, "seed": None},
            {"id": "b", "image": None, "prompt": "Q", "max_new_tokens": None, "seed": 3}]
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("id,image,prompt,max_new_tokens,seed\na,i.png,P,7,\nb,,Q,,3\n", encoding="utf-8")
    pq_path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(recs), pq_path)
    from_csv, from_pq = discover(csv_path).rows, discover(pq_path).rows
    assert from_csv == from_pq
    assert from_pq[0].settings == {"max_new_tokens": 7} and from_pq[1].settings == {"seed": 3}


@pytest.mark.parametrize("content, match", [
    ('{"image": "a.png"}\n', "has no id"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "more than once"),
    ('{"id": "a"\n', "line 1 is not JSON"),
    ("[1, 2]\n", "must be a JSON object"),
    ("", "holds no rows"),
])
def test_bad_tables_are_refused_as_a_whole(tmp_path, content, match):
    table = tmp_path / "t.jsonl"
    table.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        discover(table)


def test_missing_input_and_unknown_file_type(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="not a table"):
        discover(tmp_path / "x.txt")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot be read as Parquet"):
        discover(tmp_path / "bad.parquet")


def test_row_json_round_trip_keeps_types():
    row = Row("id-1", "prompt ü", ("video", "/x/y.mp4"), {"temperature": 0.0, "seed": 5}, None)
    assert Row.from_json(row.to_json()) == row
    assert Row.from_json(Row("t", "p").to_json()) == Row("t", "p")
