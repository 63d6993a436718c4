"""Where a batch job's results go: JSONL or Parquet, written in atomic chunks, resumable.

Every result is one record with the fields ``FIELDS`` (``id``, ``answer``, ``reasoning``,
``prompt_tokens``, ``completion_tokens``, ``finish_reason``, ``error``). ``open_output(path)``
reads what an earlier run of the job already wrote (``done`` ids: those rows are skipped) and
returns a writer whose ``write(records)`` adds one chunk:

- JSONL (``.jsonl``): the chunk's lines are appended with one write and fsync'd. A run killed
  during a write can leave a partial last line: the next ``open_output`` cuts it off (those rows
  are redone). A line that is not a JSON object with an ``id`` is never silently dropped: the
  file is refused with an error naming the line.
- Parquet (``.parquet``): a file cannot be appended to, so each chunk is its own part file in
  ``OUT.parquet.parts/``, written to a temporary name and renamed into place (atomic). ``close``
  merges what the output already held and every part into ``OUT.parquet`` (again through a
  temporary file and a rename), then removes the parts. A kill at any point leaves either parts,
  or the merged file, or both; reading dedups by id, so no row is counted twice.

A writer never writes an id twice (records whose id is already done are dropped and counted in
``duplicates``), which is what makes retried work (a restarted Ray worker) safe. This module
does not run models or know about Ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError
from .inputs import import_pyarrow_parquet

log = logging.getLogger(__name__)

FIELDS = ("id", "answer", "reasoning", "prompt_tokens", "completion_tokens", "finish_reason", "error")


def output_format(path: str | Path) -> str:
    """"jsonl" or "parquet" from the output's extension (InputError for anything else)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise InputError(f"output {path}: use a .jsonl or .parquet file name")


def open_output(path: str | Path) -> JsonlWriter | ParquetWriter:
    """A writer for ``path`` that knows the ids an earlier run already wrote."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a directory; give a .jsonl or .parquet file name")
    if not path.parent.is_dir():
        raise InputError(f"the folder of the output {path} does not exist")
    return JsonlWriter(path) if output_format(path) == "jsonl" else ParquetWriter(path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        self.written = 0
        self.failed = 0  # written records that carry an error
        self.duplicates = 0

    def _fresh(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for rec in records:
            rid = str(rec["id"])
            if rid in self.done:
                self.duplicates += 1
                log.warning("dropping a second result for row %r (already written)", rid)
                continue
            self.done.add(rid)
            self.failed += rec.get("error") is not None
            out.append({k: rec.get(k) for k in FIELDS})
        return out


class JsonlWriter(_Writer):
    """Append-only JSONL output; see the module docstring."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        if path.exists():
            self._recover()

    def _recover(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes after the last newline are a line cut by a kill
        if end < len(data):
            log.warning("%s ends with a partial line (%d bytes, an interrupted write); removing it",
                        self.path, len(data) - end)
            with self.path.open("r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{self.path} line {n} is not JSON ({e}); it does not look like the output "
                                 "of a batch job: give another output file") from e
            if not isinstance(rec, dict) or "id" not in rec:
                raise InputError(f"{self.path} line {n} has no 'id'; it does not look like the output of a "
                                 "batch job: give another output file")
            self.done.add(str(rec["id"]))

    def write(self, records: list[dict[str, Any]]) -> int:
        fresh = self._fresh(records)
        if not fresh:
            return 0
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.written += len(fresh)
        return len(fresh)

    def close(self) -> None:
        """Nothing is buffered: every ``write`` is already on disk."""


def _arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("answer", pa.string()), ("reasoning", pa.string()),
                      ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                      ("finish_reason", pa.string()), ("error", pa.string())])


class ParquetWriter(_Writer):
    """Part files while running, one Parquet file at ``close``; see the module docstring."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.pq = import_pyarrow_parquet()
        self.parts = path.with_name(path.name + ".parts")
        self._next = 0
        if path.exists():
            self.done.update(self._ids(path))
        if self.parts.is_dir():
            for tmp in self.parts.glob("*.tmp"):
                tmp.unlink()  # a part that was being written when the job died
            for part in self._part_files():
                self.done.update(self._ids(part))
                self._next = max(self._next, int(part.stem.split("-")[1]) + 1)

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def _ids(self, file: Path) -> list[str]:
        try:
            table = self.pq.read_table(file, columns=["id"])
        except (OSError, ValueError) as e:
            raise InputError(f"{file} cannot be read as Parquet ({e}); give another output file") from e
        except KeyError as e:
            raise InputError(f"{file} has no 'id' column; give another output file") from e
        return [str(x) for x in table.column("id").to_pylist()]

    def write(self, records: list[dict[str, Any]]) -> int:
        import pyarrow as pa

        fresh = self._fresh(records)
        if not fresh:
            return 0
        self.parts.mkdir(exist_ok=True)
        final = self.parts / f"part-{self._next:06d}.parquet"
        tmp = final.with_suffix(".tmp")
        self.pq.write_table(pa.Table.from_pylist(fresh, schema=_arrow_schema()), tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.parts)
        self._next += 1
        self.written += len(fresh)
        return len(fresh)

    def close(self) -> None:
        """Merge the output and its parts into one Parquet file (dedup by id), drop the parts."""
        import pyarrow as pa

        parts = self._part_files()
        if not parts:
            return
        sources = ([self.path] if self.path.exists() else []) + parts
        seen: set[str] = set()
        tables = []
        for src in sources:
            table = self.pq.read_table(src).select(list(FIELDS)).cast(_arrow_schema())
            ids = [str(x) for x in table.column("id").to_pylist()]
            keep = [i for i, rid in enumerate(ids) if not (rid in seen or seen.add(rid))]
            tables.append(table.take(pa.array(keep, type=pa.int64())) if len(keep) < len(ids) else table)
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.pq.write_table(pa.concat_tables(tables), tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        shutil.rmtree(self.parts)


def read_output(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a finished (or interrupted) output, for tests and scripts."""
    path = Path(path)
    if output_format(path) == "jsonl":
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pq = import_pyarrow_parquet()
    files = ([path] if path.exists() else []) + sorted(path.with_name(path.name + ".parts").glob("part-*.parquet"))
    return [rec for f in files for rec in pq.read_table(f).to_pylist()]
