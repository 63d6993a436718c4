"""Turning a ``Row`` into model inputs on a CPU: read and decode its media, apply the chat
template, slice and patchify (the processor), merge the job's and the row's settings.

``Preparer(processor, defaults)`` is used the same way by the local runner (in worker threads,
with the loaded model's own processor) and by Ray's CPU workers (with ``load_processor(model)``,
which reads the checkpoint's tokenizer and configs but no weights), so both runners feed the
replicas identical inputs. A row that cannot be prepared (unreadable or corrupt file, not an
image, bad setting, prompt too long) comes back as a ``Prepared`` carrying its error. This
module does not run the model or write output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig, ProcessorConfig
from ..errors import MiniCPMVError
from ..processing.image import load_image
from ..processing.processor import ModelInputs, Processor
from ..processing.video import Video
from .engine_adapter import error_text, make_inputs
from .inputs import Row

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A row ready for a model replica: its inputs and merged settings, or its error."""

    id: str
    inputs: ModelInputs | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def load_processor(model: str | Path) -> Processor:
    """The processor of a checkpoint (tokenizer, template, slicing config) without its weights."""
    from ..api import check_consistency
    from ..loading.checkpoint import read_config, resolve_checkpoint

    path = resolve_checkpoint(str(model))
    raw, spec = read_config(path)
    cfg = ModelConfig.from_hf_dict(raw, **spec.config_kwargs())
    processor = Processor.from_dir(path, spec, default_cfg=ProcessorConfig.from_model_config(cfg))
    check_consistency(cfg, processor.cfg)
    return processor


def merge_settings(defaults: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's settings over the job's (a row value of None keeps the job's)."""
    out = {k: v for k, v in defaults.items() if v is not None}
    out.update({k: v for k, v in row.items() if v is not None})
    return out


class Preparer:
    """Row -> ``Prepared`` with one processor and the job's default settings."""

    def __init__(self, processor: Processor, defaults: Mapping[str, Any]) -> None:
        self.processor = processor
        self.defaults = dict(defaults)

    def __call__(self, row: Row) -> Prepared:
        settings = merge_settings(self.defaults, row.settings)
        if row.error is not None:
            return Prepared(row.id, settings=settings, error=f"InputError: {row.error}")
        try:
            content: list[Any] = [self._media(row.media)] if row.media else []
            content.append(row.prompt)
            conversation = [{"role": "user", "content": content}]
            inputs = make_inputs(self.processor, conversation, settings)
        except MiniCPMVError as e:
            return Prepared(row.id, settings=settings, error=error_text(e))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the job; logged with its trace
            log.exception("preparing row %r failed", row.id)
            return Prepared(row.id, settings=settings, error=error_text(e))
        return Prepared(row.id, inputs, settings)

    @staticmethod
    def _media(media: tuple[str, str]) -> Any:
        kind, path = media
        if kind == "video":
            video = Video(path)
            video.info()  # probe now: an unreadable video is this row's error, before any decoding
            return video
        return load_image(path)
