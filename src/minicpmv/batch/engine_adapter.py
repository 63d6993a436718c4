"""The one place where batch jobs touch the generation engine.

Two calls, both per row:

- ``make_inputs(processor, conversation, settings)``: the processor's ``ModelInputs`` for one
  conversation (CPU only, no model: it runs in the local runner's worker threads and on Ray's
  CPU workers, and the result travels to a model replica).
- ``EngineAdapter(chat_model).submit(inputs, settings, on_done)``: the row joins the running
  continuous batch (``engine.batch.BatchEngine``, batch-invariant by default, so a row's greedy
  answer does not depend on what else is in the batch); ``on_done`` receives an ``Answer``
  (answer text, reasoning for 4.5 thinking, prompt and completion token counts, finish reason)
  or an ``Answer`` carrying the row's error. ``run(items)`` does the same for a list and blocks.

Token ids become text through the engine's ``TextStream`` with the release's answer rules, as in
the server and ``chat()`` (terminators dropped, UTF-8 safe decoding, stripped where the release
strips, thinking split at ``</think>``), so a greedy answer equals
``chat(..., sampling=False, num_beams=1, repetition_penalty=1.0, id0_quirk=False)``.
Settings are plain dicts with the keys of ``inputs.SETTING_COLUMNS``; ``temperature == 0`` is
greedy, a missing sampling key takes the official ``chat()`` sampling preset's value.
This module does not read files, decode media or write output.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.batch import BatchEngine, BatchEvent, BatchRequest
from ..engine.chat import ChatModel
from ..engine.sampling import SamplingParams, official_preset
from ..errors import MiniCPMVError
from ..processing.processor import ModelInputs, Processor

log = logging.getLogger(__name__)

NO_TRUNCATION = 2**31  # a prompt is never cut: too long is the row's error
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class Answer:
    """What one row produced (``error`` set and the rest empty when it failed)."""

    answer: str | None = None
    reasoning: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


def error_text(e: BaseException) -> str:
    """One line for the ``error`` column: the library's message, or the internal error's type."""
    if isinstance(e, MiniCPMVError):
        return f"{type(e).__name__}: {e}"
    return f"internal error ({type(e).__name__}: {e})"


def make_inputs(processor: Processor, conversation: list[dict[str, Any]], settings: Mapping[str, Any]) -> ModelInputs:
    """Processor output for one conversation with the row's system prompt, thinking and slices."""
    thinking = settings.get("enable_thinking")
    return processor(
        [conversation], system_prompt=settings.get("system_prompt") or "",
        enable_thinking=bool(thinking) if processor.version.supports_thinking else (True if thinking else None),
        max_slice_nums=settings.get("max_slice_nums"), max_length=NO_TRUNCATION,
    )


def sampling_params(chat_model: ChatModel, settings: Mapping[str, Any]) -> SamplingParams:
    """The row's settings: greedy at temperature 0, else the official sampling preset with the
    row's explicit values on top (every explicit value applies, unlike chat()'s merge rule)."""
    preset, _ = official_preset(chat_model.version, sampling=True,
                                enable_thinking=bool(settings.get("enable_thinking")))
    temperature = float(settings.get("temperature", preset.get("temperature", 1.0)))
    max_new = int(settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    if temperature == 0:
        return SamplingParams(max_new_tokens=max_new, repetition_penalty=float(settings.get("repetition_penalty", 1.0)),
                              seed=settings.get("seed"))
    return SamplingParams(
        max_new_tokens=max_new, do_sample=True, temperature=temperature,
        top_p=float(settings.get("top_p", preset.get("top_p", 1.0))),
        top_k=int(settings.get("top_k", preset.get("top_k", 0)) or 0),
        repetition_penalty=float(settings.get("repetition_penalty", preset.get("repetition_penalty", 1.0))),
        seed=settings.get("seed"),
    )


class EngineAdapter:
    """A ``BatchEngine`` over one loaded model, answering rows; see the module docstring.

    ``start()`` runs the engine in a background thread (then ``submit`` returns at once and
    ``on_done`` is called from that thread); without it ``run`` steps the engine in the caller.
    """

    def __init__(self, chat_model: ChatModel, *, max_batch_size: int = 8, max_model_len: int | None = None,
                 batch_invariant: bool = True) -> None:
        self.model = chat_model
        self.engine = BatchEngine(chat_model, max_batch_size=max_batch_size, max_model_len=max_model_len,
                                  max_queue=1 << 20, batch_invariant=batch_invariant)
        self._background = False

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    def start(self) -> None:
        self.engine.start()
        self._background = True

    def stop(self) -> None:
        self.engine.stop()

    def submit(self, inputs: ModelInputs, settings: Mapping[str, Any], on_done: Callable[[Answer], None]) -> None:
        """Queue one row; ``on_done`` gets its ``Answer`` exactly once."""
        try:
            params = sampling_params(self.model, settings)
        except MiniCPMVError as e:
            on_done(Answer(error=error_text(e)))
            return
        thinking = bool(settings.get("enable_thinking")) and self.model.version.supports_thinking
        text = self.model.runner.text_stream(id0_quirk=False, thinking=thinking)
        prompt_tokens = len(inputs.input_ids[0])

        def on_event(event: BatchEvent) -> None:
            if event.error is not None or event.finish_reason in ("error", "cancelled"):
                err = event.error or MiniCPMVError(f"generation was {event.finish_reason}")
                on_done(Answer(error=error_text(err)))
                return
            if event.token_id is not None:
                text.feed(event.token_id)
            if event.finish_reason is not None:
                text.finish(event.finish_reason)
                on_done(Answer(text.content, text.reasoning if thinking else None, prompt_tokens,
                               text.completion_tokens, event.finish_reason))

        try:
            self.engine.submit(BatchRequest(inputs, params, on_event))
        except MiniCPMVError as e:
            on_done(Answer(error=error_text(e)))

    def run(self, items: list[tuple[ModelInputs, Mapping[str, Any]]]) -> list[Answer]:
        """Answer every item (in the calling thread unless ``start`` was called); keeps order."""
        out: list[Answer | None] = [None] * len(items)
        left = threading.Semaphore(0)

        def sink(i: int) -> Callable[[Answer], None]:
            def done(a: Answer) -> None:
                out[i] = a
                left.release()
            return done

        for i, (inputs, settings) in enumerate(items):
            self.submit(inputs, settings, sink(i))
        if not self._background:
            self.engine.run_until_idle()
        for _ in items:
            left.acquire()
        return [a if a is not None else Answer(error="internal error (no answer)") for a in out]
