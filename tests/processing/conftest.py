"""Shared fixtures for the processing tests: case loading and cached tokenizers/processors.

Only fixtures live here (test modules never import this file, so it cannot clash with other
``conftest.py`` modules); parametrize lists are built in the test modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from minicpmv.processing.processor import Processor
from minicpmv.processing.tokenizer import Tokenizer
from minicpmv.versions import get_version

DATA = Path(__file__).resolve().parents[1] / "data"
REAL45 = DATA / "real-4.5"
REAL45_RELEASE = REAL45 / "release"
CONFORMANCE = DATA / "conformance"


def _to_official(case: Path, msg: dict[str, Any]) -> dict[str, Any]:
    content: list[Any] = []
    for item in msg["content"]:
        if item["type"] == "image":
            with Image.open(case / item["file"]) as im:
                content.append(im.convert("RGB"))
        else:
            content.append(item["text"])
    return {"role": msg["role"], "content": content}


def _load_case(case: Path) -> tuple[list[list[dict[str, Any]]], dict[str, Any], dict[str, Any]]:
    """(conversations with PIL images, params.json, expected meta.json) of one case."""
    params = json.loads((case / "inputs" / "params.json").read_text(encoding="utf-8"))
    msgs = json.loads((case / "inputs" / "msgs.json").read_text(encoding="utf-8"))
    convs = msgs if params.get("batched") else [msgs]
    conversations = [[_to_official(case, m) for m in conv] for conv in convs]
    meta = json.loads((case / "expected" / "meta.json").read_text(encoding="utf-8"))
    return conversations, params, meta


@pytest.fixture(scope="session")
def load_case():
    """``load_case(case_dir) -> (conversations with PIL images, params, expected meta)``."""
    return _load_case


@pytest.fixture(scope="session")
def real45_tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(REAL45_RELEASE)


@pytest.fixture(scope="session")
def real45_processor() -> Processor:
    return Processor.from_dir(REAL45_RELEASE, get_version("4.5"))


@pytest.fixture(scope="session")
def conformance_processors() -> dict[str, Processor]:
    return {v: Processor.from_dir(CONFORMANCE / v / "_checkpoint", get_version(v)) for v in ("2.6", "4.5")}
