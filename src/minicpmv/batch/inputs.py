"""What a batch job works on: rows found in a folder, a glob or a table, with their settings.

``discover(source, default_prompt=...)`` returns the job's ``Row`` list in a fixed order:

- a folder: every file below it (recursively, hidden files and folders skipped) whose extension
  is an image's or a video's; ``id`` is the path relative to the folder (``/`` separators).
  Other files are not rows; their count is returned so the caller can report it.
- a glob (``data/**/*.jpg``): every matching file; ``id`` is the path relative to the glob's
  fixed leading folders. A file whose extension is not a video's is read as an image.
- a table (``.jsonl``, ``.csv``, ``.parquet``): one row per record. Columns: ``id``
  (required, unique), ``image`` or ``video`` (a local path, relative to the table's folder;
  neither means a text-only prompt), ``prompt`` (else the default prompt), and optional
  generation settings (``SETTING_COLUMNS``); other columns are ignored (logged once).

A row whose own fields are wrong (a URL instead of a path, a bad setting) is still a row: it
carries its ``error`` and the job writes it as a failed row, so one bad record never stops a run.
Problems with the source as a whole (missing file, no ``id`` column, duplicate ids) raise
``InputError``. Nothing here opens an image or a video or loads a model.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg"})
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
DEFAULT_IMAGE_PROMPT = "Describe this image."
DEFAULT_VIDEO_PROMPT = "Describe this video."
DEFAULT_TEXT_PROMPT = ""

# Per-row generation settings a table may carry, with the type each value must have.
SETTING_COLUMNS: dict[str, type] = {
    "max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int,
    "repetition_penalty": float, "seed": int, "enable_thinking": bool, "system_prompt": str,
    "max_slice_nums": int,
}


@dataclass(frozen=True, slots=True)
class Row:
    """One unit of work. ``media`` is ("image" | "video", absolute path) or None for text only;
    ``settings`` holds only the generation settings this row overrides."""

    id: str
    prompt: str
    media: tuple[str, str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> str:
        """The row as one JSON string (how it crosses processes: no type coercion on the way)."""
        return json.dumps({"id": self.id, "prompt": self.prompt, "media": self.media, "settings": self.settings,
                           "error": self.error}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Row:
        d = json.loads(text)
        media = (str(d["media"][0]), str(d["media"][1])) if d.get("media") else None
        return cls(str(d["id"]), str(d["prompt"]), media, dict(d.get("settings") or {}), d.get("error"))


@dataclass
class Discovery:
    rows: list[Row]
    skipped_files: int = 0  # files in a folder that are neither images nor videos


def discover(source: str | Path, *, default_prompt: str | None = None) -> Discovery:
    """The rows of ``source`` (folder, glob or table); see the module docstring."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        found = _folder(path, default_prompt)
    elif path.is_file():
        found = Discovery(_table(path, default_prompt))
    elif glob.has_magic(text):
        found = Discovery(_glob(text, default_prompt))
    else:
        raise InputError(f"input {text} does not exist (give a folder, a glob, or a .jsonl/.csv/.parquet table)")
    _check_unique(found.rows, text)
    return found


def _prompt_for(kind: str | None, default_prompt: str | None) -> str:
    if default_prompt is not None:
        return default_prompt
    return {"image": DEFAULT_IMAGE_PROMPT, "video": DEFAULT_VIDEO_PROMPT}.get(kind or "", DEFAULT_TEXT_PROMPT)


def media_kind(path: str | Path) -> str | None:
    """"image", "video" or None (neither), from the file extension."""
    ext = Path(path).suffix.lower()
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def _folder(root: Path, default_prompt: str | None) -> Discovery:
    rows, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            kind = media_kind(full)
            if kind is None:
                skipped += 1
                continue
            rel = full.relative_to(root).as_posix()
            rows.append(Row(rel, _prompt_for(kind, default_prompt), (kind, str(full.resolve()))))
    rows.sort(key=lambda r: r.id)
    if skipped:
        log.info("%s: %d file(s) are neither images nor videos and are not rows", root, skipped)
    return Discovery(rows, skipped)


def _glob(pattern: str, default_prompt: str | None) -> list[Row]:
    parts = Path(pattern).parts
    fixed = [p for p in _takewhile_fixed(parts)]
    base = Path(*fixed) if fixed else Path(".")
    rows = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        full = Path(match)
        if not full.is_file():
            continue
        kind = "video" if media_kind(full) == "video" else "image"
        rel = os.path.relpath(full, base).replace(os.sep, "/")
        rows.append(Row(rel, _prompt_for(kind, default_prompt), (kind, str(full.resolve()))))
    if not rows:
        raise InputError(f"the glob {pattern} matches no file")
    return rows


def _takewhile_fixed(parts: tuple[str, ...]) -> list[str]:
    out = []
    for p in parts[:-1]:
        if glob.has_magic(p):
            break
        out.append(p)
    return out


# ---------------------------------------------------------------------------- tables
def _table(path: Path, default_prompt: str | None) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise InputError(f"input {path} is a file but not a table: use a .jsonl, .csv or .parquet file, "
                         "or a folder of images and videos")
    known = {"id", "image", "video", "prompt", *SETTING_COLUMNS}
    extra = sorted({k for r in records for k in r} - known)
    if extra:
        log.info("%s: ignoring column(s) %s", path, ", ".join(extra))
    return [_table_row(rec, i, path.parent, default_prompt) for i, rec in enumerate(records, 1)]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {n} is not JSON: {e}") from e
            if not isinstance(rec, dict):
                raise InputError(f"{path} line {n} must be a JSON object")
            records.append(rec)
    return records


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [{k: (v if v != "" else None) for k, v in rec.items() if k is not None} for rec in csv.DictReader(f)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    pq = import_pyarrow_parquet()
    try:
        return pq.read_table(path).to_pylist()
    except OSError as e:  # pyarrow raises ArrowInvalid (an OSError/ValueError) for a bad file
        raise InputError(f"{path} cannot be read as Parquet: {e}") from e
    except ValueError as e:
        raise InputError(f"{path} cannot be read as Parquet: {e}") from e


def import_pyarrow_parquet() -> Any:
    """``pyarrow.parquet``, or a one-line InputError saying which extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError('Parquet tables need pyarrow: pip install "minicpmv[batch]"') from e
    return pq


def _table_row(rec: dict[str, Any], n: int, base: Path, default_prompt: str | None) -> Row:
    rid = rec.get("id")
    if rid is None or (isinstance(rid, float) and math.isnan(rid)) or str(rid) == "":
        raise InputError(f"table row {n} has no id (every row needs a unique 'id')")
    rid = str(rid)
    errors: list[str] = []
    media = _media(rec, base, errors)
    prompt = rec.get("prompt")
    if _missing(prompt):
        prompt = _prompt_for(media[0] if media else None, default_prompt)
    elif not isinstance(prompt, str):
        errors.append(f"prompt must be text, got {type(prompt).__name__}")
        prompt = ""
    settings = {}
    for key, kind in SETTING_COLUMNS.items():
        value = rec.get(key)
        if _missing(value):
            continue
        try:
            settings[key] = _coerce(value, kind)
        except (TypeError, ValueError):
            errors.append(f"{key} must be {kind.__name__}, got {value!r}")
    if not media and not prompt:
        errors.append("the row has no image, no video and no prompt")
    return Row(rid, prompt, media, settings, "; ".join(errors) or None)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _media(rec: dict[str, Any], base: Path, errors: list[str]) -> tuple[str, str] | None:
    given = [(k, rec.get(k)) for k in ("image", "video") if not _missing(rec.get(k))]
    if not given:
        return None
    if len(given) > 1:
        errors.append("a row holds an image or a video, not both")
    kind, value = given[0]
    if not isinstance(value, str) or not value:
        errors.append(f"{kind} must be a file path, got {value!r}")
        return None
    if "://" in value:
        errors.append(f"{kind} {value} is a URL; batch jobs read local files only (download them first)")
        return None
    return kind, str((base / value).resolve())


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(value)
        return out
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _check_unique(rows: list[Row], source: str) -> None:
    seen: set[str] = set()
    for r in rows:
        if r.id in seen:
            raise InputError(f"{source}: the id {r.id!r} appears more than once; ids must be unique "
                             "(they are how a resumed job knows what is done)")
        seen.add(r.id)
    if not rows:
        raise InputError(f"{source} holds no rows (no images or videos found)")
