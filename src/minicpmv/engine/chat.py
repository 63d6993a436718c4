"""``ChatModel``: the official ``chat()`` contract, as a thin facade over ``ModelRunner``.

``chat()`` takes the reference's keyword arguments and returns what it returns (a string, a
list for a batch, an iterator of text chunks with ``stream=True``), reproducing its observable
behaviour through the quirk seam (``compat.py``) and the official presets
(``SamplingParams.from_official``). ``respond()`` answers the same calls with more: a
``ChatResponse`` per conversation (the official text, the reasoning and the answer of thinking
mode split apart, the finish reason and token counts), or with ``stream=True`` the
``TextEvent``s of the answer. The work itself (inputs -> embeddings -> tokens -> text) is the
runner's; this file owns no per-conversation state (``ChatSession`` does) and parses no CLI
arguments or HTTP requests.

MiniCPM-o speech (``generate_audio=True``, official keywords ``output_audio_path``,
``return_spk_embed``, ``return_dict``): ``chat()`` returns an ``OmniOutput`` (text + 24 kHz
waveform), or with ``stream=True`` its chunks (the official streaming path); ``respond()`` adds
the audio to its ``ChatResponse``. ``generate_audio=True`` turns the speech template on (the
official code silently gives no audio without it); a batch with speech is refused (the official
speech head takes one conversation). The speech work is ``spoken.py``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import FeatureNotAvailableError, InputError
from ..processing.processor import Processor
from ..versions import VersionSpec
from . import compat
from .generate import DecodeMode
from .runner import ModelRunner, PreparedBatch
from .sampling import SamplingParams
from .speech import OmniOutput
from .spoken import SpeechRequest, answer_with_speech, stream_with_speech
from .stream import FinishReason, TextEvent, TextStream, merge_events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatResponse:
    """One conversation's answer. ``text`` is what the official ``chat()`` returns; in thinking
    mode ``reasoning`` holds the thought and ``content`` the answer after ``</think>`` (without
    thinking ``reasoning`` is None and ``content`` is the answer)."""

    text: str
    content: str
    reasoning: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    # MiniCPM-o with generate_audio=True: the spoken answer (float32 [N]) and its rate; the
    # speaker state [1, llm_dim] with return_spk_embed=True
    audio_wav: Any = None
    sampling_rate: int | None = None
    spk_embeds: torch.Tensor | None = None


# chat() keywords of the speech part (official ones and ours), popped by ChatModel._speech_request
SPEECH_KEYS = ("output_audio_path", "return_spk_embed", "return_dict", "speech_options", "speech_trace",
               "first_chunk", "max_audio_seconds")


@dataclass
class ChatCall:
    """One call's conversations and settings after the official keyword handling."""

    conversations: list[list[dict[str, Any]]]
    batched: bool
    params: SamplingParams
    proc_kwargs: dict[str, Any]
    thinking: bool
    id0_quirk: bool
    speech: SpeechRequest | None = None  # set when an OmniOutput is asked for (generate_audio, ...)


class ChatModel:
    """A loaded checkpoint with the official chat(); ``runner`` does the work."""

    def __init__(
        self, model: torch.nn.Module, processor: Processor, version: VersionSpec, config: ModelConfig, *,
        path: str = "", decode_mode: DecodeMode | None = None,
    ) -> None:
        self.runner = ModelRunner(model, processor, version, config, decode_mode)
        self.path = path

    model = property(lambda self: self.runner.model, doc="the MiniCPMV network")
    processor = property(lambda self: self.runner.processor)
    version = property(lambda self: self.runner.version)
    config = property(lambda self: self.runner.config)
    tokenizer = property(lambda self: self.runner.tokenizer)
    device = property(lambda self: self.runner.device)

    @property
    def encoded_entries(self) -> int:
        return self.runner.encoded_entries

    def terminator_ids(self) -> tuple[int, ...]:
        return self.runner.eos_ids

    def prepare(self, conversations: list[list[dict[str, Any]]], *, id0_quirk: bool = True,
                **proc_kwargs: Any) -> PreparedBatch:
        """Processor + ``runner.prepare``: the padded ids, mask and merged embeddings of a batch."""
        return self.runner.prepare(self.processor(conversations, **proc_kwargs), id0_quirk=id0_quirk)

    # ------------------------------------------------------------------ official
    def chat(
        self, msgs: Any, image: Any = None, *, stream: bool = False, **kwargs: Any
    ) -> str | list[str] | Iterator[str] | OmniOutput | Iterator[OmniOutput]:
        """Answer one conversation (a list of messages) or a batch (a list of conversations).

        Keyword arguments are the official ``MiniCPMV.chat``'s (``max_new_tokens``,
        ``min_new_tokens``, ``sampling``, ``max_inp_length``, ``system_prompt``,
        ``max_slice_nums``, ``use_image_id``, ``temporal_ids``, ``enable_thinking``, and
        generation keys merged by the official rule, see ``SamplingParams.from_official``), plus
        ``seed`` (reproducible sampling), ``id0_quirk=False`` (turn off the reference's id-0
        handling, spec §16.1), ``params=`` (a ``SamplingParams`` that replaces the presets).
        MiniCPM-o: ``msgs`` may hold audio clips, ``use_tts_template`` picks the speech template;
        ``generate_audio=True`` returns an ``OmniOutput`` (text + 24 kHz ``audio_wav``; written as
        a WAV to ``output_audio_path``), with ``stream=True`` an iterator of ``OmniOutput`` chunks
        (text and audio as they are produced); ``return_spk_embed`` / ``return_dict`` as the
        official; ``speech_options=SpeechOptions(...)`` sets the speech sampling (e.g. ``seed``,
        ``greedy``, ``max_frames``), ``first_chunk`` the streaming variant, ``max_audio_seconds``
        cuts the spoken answer at that length.
        """
        call = self._call(msgs, image, kwargs)
        if call.speech is not None:
            return self._omni(call, stream)
        if stream:
            if call.batched:
                raise InputError("stream=True supports a single conversation, not a batch")
            return self._official_stream(call)
        answers = self._answers(call)
        return answers if call.batched else answers[0]

    def _answers(self, call: ChatCall) -> list[str]:
        with torch.inference_mode():
            rows = self.runner.generate_ids(self._prepare(call), call.params)
        prefix = compat.thinking_prefix(self.version, call.thinking)
        return [prefix + self.runner.postprocess(r, id0_quirk=call.id0_quirk) for r in rows]

    def _official_stream(self, call: ChatCall) -> Iterator[str]:
        """The reference's streamer: word chunks, terminator strings removed, no attention mask
        (so no id-0 handling), the thinking prefix yielded a character at a time."""
        rules = compat.official_stream_rules(self.version, self.tokenizer)

        plain = dataclasses.replace(call, id0_quirk=False)

        def run() -> Iterator[str]:
            yield from compat.thinking_prefix(self.version, call.thinking)
            for event in self._events(plain, TextStream(self.runner.decode, rules, chunking="word")):
                if event.text:
                    yield event.text

        return run()

    def _omni(self, call: ChatCall, stream: bool) -> OmniOutput | Iterator[OmniOutput]:
        """chat() asked for an ``OmniOutput`` (speech, speaker state or ``return_dict``)."""
        speech = call.speech
        assert speech is not None
        if call.batched:  # only return_dict reaches here (_speech_request refuses the rest)
            return OmniOutput(text=self._answers(call))  # type: ignore[arg-type]
        if stream:
            if not speech.generate_audio:
                return OmniOutput(text=self._official_stream(call))
            return stream_with_speech(self, self._prepare(call), call.params, speech)
        with torch.inference_mode():
            batch = self._prepare(call)
            ids = self.runner.generate_ids(batch, call.params)[0]
        return answer_with_speech(self, batch, ids, speech)

    # ------------------------------------------------------------------ richer answers
    def respond(
        self, msgs: Any, image: Any = None, *, stream: bool = False, stops: list[str] | None = None, **kwargs: Any
    ) -> ChatResponse | list[ChatResponse] | Iterator[TextEvent]:
        """``chat()``'s call, answered with ``ChatResponse`` objects (or, with ``stream=True``, the
        ``TextEvent``s of one conversation's answer). ``stops``: strings that end the answer.

        With ``generate_audio=True`` the response also holds ``audio_wav`` / ``sampling_rate``
        (and ``spk_embeds`` with ``return_spk_embed``); streamed, it yields ``OmniOutput``
        chunks (text + audio) whose last one carries the finish reason."""
        call = self._call(msgs, image, kwargs)
        if call.speech is not None:
            return self._spoken_response(call, stream, stops or ())
        if stream:
            if call.batched:
                raise InputError("stream=True supports a single conversation, not a batch")
            text = self.runner.text_stream(id0_quirk=call.id0_quirk, thinking=call.thinking, stops=stops or ())
            return self._events(call, text)
        with torch.inference_mode():
            batch = self._prepare(call)
            rows = self.runner.generate_ids(batch, call.params)
        prompt_lens = [len(ids) for ids in batch.inputs.input_ids]
        out = [self._response(r, n, call, stops or ()) for r, n in zip(rows, prompt_lens, strict=True)]
        return out if call.batched else out[0]

    def _spoken_response(self, call: ChatCall, stream: bool,
                         stops: list[str] | tuple) -> ChatResponse | Iterator[OmniOutput]:
        speech = call.speech
        assert speech is not None
        if call.batched:
            raise InputError("respond() with return_dict answers one conversation at a time")
        if stream:
            if stops:
                raise InputError("stops cannot be combined with a streamed spoken answer")
            return stream_with_speech(self, self._prepare(call), call.params, speech)
        with torch.inference_mode():
            batch = self._prepare(call)
            ids = self.runner.generate_ids(batch, call.params)[0]
        response = self._response(ids, len(batch.inputs.input_ids[0]), call, stops)
        spoken = answer_with_speech(self, batch, ids, speech)
        return dataclasses.replace(response, audio_wav=spoken.audio_wav, sampling_rate=spoken.sampling_rate,
                                   spk_embeds=spoken.spk_embeds)

    def _events(self, call: ChatCall, text: TextStream) -> Iterator[TextEvent]:
        with torch.inference_mode():
            for step in self.runner.steps(self._prepare(call), call.params):
                event = text.feed(int(step.tokens[0]))
                reason = step.reasons[0] or ("stop" if text.stopped else None)
                if reason is not None:
                    yield merge_events(event, text.finish(reason))
                    return
                if event.text:
                    yield event

    def _response(self, ids: list[int], prompt_tokens: int, call: ChatCall, stops: list[str] | tuple) -> ChatResponse:
        """The response of one row of ``generate_ids`` (rows run on with padding after their end)."""
        stop_ids = {*self.runner.eos_ids, *call.params.stop_token_ids}
        end = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
        text = self.runner.text_stream(id0_quirk=call.id0_quirk, thinking=call.thinking, stops=stops)
        for t in ids[:end]:
            if text.stopped:
                break
            text.feed(t)
        reason: FinishReason = "stop" if end < len(ids) or ids[end - 1] in stop_ids or text.stopped else "length"
        text.finish(reason)
        official = compat.thinking_prefix(self.version, call.thinking) + self.runner.postprocess(
            ids, id0_quirk=call.id0_quirk)
        return ChatResponse(text=official, content=text.content, reasoning=text.reasoning if call.thinking else None,
                            finish_reason=reason, prompt_tokens=prompt_tokens,
                            completion_tokens=text.completion_tokens, token_ids=list(text.token_ids))

    # ------------------------------------------------------------------ keyword handling
    def _call(self, msgs: Any, image: Any, kwargs: dict[str, Any]) -> ChatCall:
        kw = dict(kwargs)
        conversations, batched = normalise_msgs(msgs, image)
        speech = self._speech_request(kw, batched)
        thinking = bool(kw.pop("enable_thinking", False))
        compat.check_thinking(self.version, thinking)
        proc_kwargs = {
            "system_prompt": kw.pop("system_prompt", ""), "max_slice_nums": kw.pop("max_slice_nums", None),
            "use_image_id": kw.pop("use_image_id", None), "temporal_ids": kw.pop("temporal_ids", None),
            "enable_thinking": compat.thinking_flag(self.version, thinking),
            "max_length": kw.pop("max_inp_length", None),
        }
        if kw.pop("use_tts_template", speech is not None and speech.generate_audio):
            proc_kwargs["use_tts_template"] = True
        id0_quirk = bool(kw.pop("id0_quirk", True))
        params = official_params(self.version, kw)
        return ChatCall(conversations, batched, params, proc_kwargs, thinking, id0_quirk, speech)

    def _speech_request(self, kw: dict[str, Any], batched: bool) -> SpeechRequest | None:
        """The speech keywords (popped from ``kw``); None when no ``OmniOutput`` is asked for."""
        generate_audio = bool(kw.pop("generate_audio", False))
        given = {k: kw.pop(k) for k in SPEECH_KEYS if k in kw}
        return_spk, return_dict = bool(given.get("return_spk_embed")), bool(given.get("return_dict"))
        if not (generate_audio or return_spk or return_dict):
            extra = sorted(k for k in given if given[k] is not None and k not in ("return_spk_embed", "return_dict"))
            if extra:
                raise InputError(f"{', '.join(extra)} only apply with generate_audio=True")
            return None
        if generate_audio or return_spk:
            if getattr(self.model, "tts", None) is None and generate_audio:
                raise FeatureNotAvailableError(
                    f"{self.version.title} checkpoint {self.path or ''} has no speech head (its config.json needs "
                    "init_tts=true and a tts_config, as MiniCPM-o 2.6 has): call chat() without generate_audio")
            if batched:
                raise InputError("generate_audio / return_spk_embed answer one conversation, not a batch (the "
                                 "official speech head takes one); call chat() once per conversation")
            if generate_audio and kw.get("use_tts_template", True) is False:
                raise InputError("generate_audio=True needs the speech template (use_tts_template=True, the default "
                                 "with generate_audio): without it the model has no <|spk|> slot to speak from")
        return SpeechRequest(
            generate_audio=generate_audio, output_audio_path=given.get("output_audio_path"),
            options=given.get("speech_options"), trace=given.get("speech_trace"), return_spk_embed=return_spk,
            first_chunk=given.get("first_chunk") or "hold", max_seconds=given.get("max_audio_seconds"))

    def _prepare(self, call: ChatCall) -> PreparedBatch:
        return self.prepare(call.conversations, id0_quirk=call.id0_quirk, **call.proc_kwargs)


def official_params(version: VersionSpec, kwargs: dict[str, Any]) -> SamplingParams:
    """The ``SamplingParams`` of chat()-style keywords (``params=`` wins; it excludes the others).

    Consumes ``params``, ``sampling``, ``max_new_tokens``, ``min_new_tokens`` and the generation
    keys from ``kwargs``; ``enable_thinking`` is read, not consumed."""
    params = kwargs.pop("params", None)
    if params is not None:
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        if kwargs.keys() - {"enable_thinking"}:
            raise InputError(f"give generation settings either as params= or as keywords, not both "
                             f"(got {sorted(kwargs.keys() - {'enable_thinking'})})")
        return params
    thinking = bool(kwargs.pop("enable_thinking", False))
    return SamplingParams.from_official(
        version, sampling=kwargs.pop("sampling", True), enable_thinking=thinking,
        max_new_tokens=kwargs.pop("max_new_tokens", 2048), min_new_tokens=kwargs.pop("min_new_tokens", 0),
        overrides=kwargs,
    )


def normalise_msgs(msgs: Any, image: Any) -> tuple[list[list[dict[str, Any]]], bool]:
    """Official chat() input forms → a list of conversations (deep-copied) and a batched flag."""
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise InputError(f"msgs is a string but not valid JSON: {e}") from e
    if not isinstance(msgs, list) or not msgs:
        raise InputError("msgs must be a non-empty list of messages (or a list of such lists)")
    batched = isinstance(msgs[0], list)
    if batched and image is not None:
        raise InputError("image=... cannot be combined with a batch of conversations; put images in msgs")
    conversations = copy.deepcopy(msgs) if batched else [copy.deepcopy(msgs)]
    for conv in conversations:
        if not isinstance(conv, list) or not conv:
            raise InputError("every conversation must be a non-empty list of messages")
        for m in conv:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"a message must be a dict with 'role' and 'content', got {m!r:.80}")
    if image is not None and isinstance(conversations[0][0]["content"], str):
        conversations[0][0]["content"] = [image, conversations[0][0]["content"]]
    return conversations, batched
