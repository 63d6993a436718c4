"""``run_batch`` around the runners: the input is never overwritten by the output."""

from __future__ import annotations

import pytest

from minicpmv.batch.runner import run_batch
from minicpmv.errors import InputError

from .conftest import greedy_job


def test_the_input_table_is_never_the_output(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"id": "a", "prompt": "hi"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="is the input table"):
        run_batch(greedy_job(table, table))
    assert table.read_text(encoding="utf-8") == '{"id": "a", "prompt": "hi"}\n'
