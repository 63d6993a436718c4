"""``ChatSession``: a multi-turn conversation that reuses encoded images and the KV cache.

Each turn renders the whole history (so the prompt is exactly what a fresh ``chat()`` over the
same messages would see), then compares its token ids with the ids whose keys/values are already
in the session's cache: the common prefix is kept, only the new tokens are prefilled, and image
features come from the session's ``FeatureCache`` unless the image is new. The session owns its
cache and history; the model stays stateless. Beam search (``sampling=False`` with beams) runs
without KV reuse (its cache has one row per beam) but still reuses image features.

Answers follow ``chat()``: settings from the official presets (``SamplingParams.from_official``)
or an explicit ``params=``; the text is the official post-processed answer, and a streamed turn
(``ask(stream=True)`` / ``respond(stream=True)``) is read from the same ``TextStream`` as the
server's, so the concatenated stream equals the returned answer.

MiniCPM-o: ``respond(..., generate_audio=True)`` (or ``ChatSession(generate_audio=True)``) uses
the speech template and speaks each answer as ``chat(generate_audio=True)`` does (the whole
answer, then the speech head): the response's ``audio_wav``; streamed, the text events come as
usual and the final one arrives with the audio ready in ``last_response``. The voice is read at
``<|spk|>`` during the turn's prefill (``spoken.SpeakerTap``). Speech streamed while the answer
is generated is ``LiveSession``'s / ``chat(stream=True, generate_audio=True)``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import FeatureNotAvailableError, InputError
from ..processing.tts_text import speech_text
from ..processing.video import resolve_video_items
from . import compat
from .chat import ChatModel, ChatResponse, normalise_msgs, official_params
from .features import FeatureCache
from .generate import StepOutput, generate_steps
from .kv_cache import KVCache
from .runner import PreparedBatch
from .sampling import SamplingParams
from .speech import get_synthesizer, official_answer_text, speaker_hidden, speaker_position
from .speech_codes import SpeechOptions
from .spoken import SpeakerTap, cut_audio, limited_options
from .stream import TextEvent

log = logging.getLogger(__name__)


class ChatSession:
    """Keeps history, image features and the KV prefix of one conversation."""

    def __init__(
        self,
        model: ChatModel,
        *,
        system_prompt: str = "",
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        enable_thinking: bool = False,
        id0_quirk: bool = True,
        feature_cache: FeatureCache | None = None,
        max_inp_length: int | None = None,
        generate_audio: bool = False,
        speech_options: SpeechOptions | None = None,
        max_audio_seconds: float | None = None,
        **generation: Any,
    ) -> None:
        compat.check_thinking(model.version, enable_thinking)
        self.model = model  # the ChatModel (public: callers read its version and config)
        self.runner = model.runner
        self.history: list[dict[str, Any]] = []
        self.system_prompt = system_prompt
        self.max_slice_nums = max_slice_nums
        self.use_image_id = use_image_id
        self.enable_thinking = enable_thinking
        self.id0_quirk = id0_quirk
        self.max_inp_length = max_inp_length  # None: the version's default (chat()'s max_inp_length)
        self.generation = generation
        self.generate_audio = generate_audio  # MiniCPM-o: speak every answer (speech template)
        self.speech_options = speech_options
        self.max_audio_seconds = max_audio_seconds  # spoken answers are cut at this length
        self._check_speech(generate_audio)
        self._speaking = False
        self._tap: SpeakerTap | None = None
        self._voice = None
        self.features = feature_cache if feature_cache is not None else FeatureCache()
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []
        self._cached_mask: list[int] = []
        self.last_prefill_tokens = 0  # tokens prefilled by the last turn (the rest was reused)
        self._prompt_tokens = 0
        self._last: ChatResponse | None = None

    @property
    def last_response(self) -> ChatResponse | None:
        """The last completed turn's answer (None before the first one)."""
        return self._last

    def reset(self) -> None:
        """Forget the conversation (the image feature cache is kept)."""
        self.history.clear()
        self._cache = None
        self._cached_ids = []
        self._cached_mask = []

    # ------------------------------------------------------------------ turns
    def ask(self, content: Any, *, stream: bool = False, **overrides: Any) -> str | Iterator[str]:
        """Add a user turn (text, image, or a list of them) and answer it (official text)."""
        if not stream:
            return self.respond(content, **overrides).text  # type: ignore[union-attr]
        events = self.respond(content, stream=True, **overrides)

        def chunks() -> Iterator[str]:
            yield from compat.thinking_prefix(self.runner.version, self.enable_thinking)  # as the reference streams it
            for event in events:  # type: ignore[union-attr]
                if event.text:
                    yield event.text

        return chunks()

    def respond(self, content: Any, *, stream: bool = False, generate_audio: bool | None = None,
                **overrides: Any) -> ChatResponse | Iterator[TextEvent]:
        """Like ``ask``, answered with a ``ChatResponse`` (or its ``TextEvent``s with ``stream``).
        ``generate_audio``: speak this answer (default: the session's setting)."""
        speak = self.generate_audio if generate_audio is None else bool(generate_audio)
        self._check_speech(speak)
        conversation = self._with_user_turn(content)
        params = self._params(overrides)
        self._speaking = speak
        events = self._events(conversation, params)
        if stream:
            return events
        for _ in events:
            pass
        assert self._last is not None
        return self._last

    def ask_tokens(self, content: Any, **overrides: Any) -> Iterator[int]:
        """Like ``ask`` but yields the generated token ids; history is updated at the end."""
        conversation = self._with_user_turn(content)
        self._speaking = False
        ids: list[int] = []
        for t in self._token_ids(conversation, self._params(overrides)):
            ids.append(t)
            yield t
        self._finish(conversation, ids)

    def _with_user_turn(self, content: Any) -> list[dict[str, Any]]:
        items = content if isinstance(content, list) else [content]
        items = resolve_video_items(items)  # Video objects keep their sampling (and small clips) across turns
        conversation = self.history + [{"role": "user", "content": items}]
        normalise_msgs(conversation, None)  # validates the message shapes
        return conversation

    def _params(self, overrides: dict[str, Any]) -> SamplingParams:
        kw = {**self.generation, **overrides}
        if "params" in overrides:
            kw = dict(overrides)
        if "enable_thinking" in kw:
            raise InputError("thinking mode is a session setting: ChatSession(enable_thinking=...)")
        return official_params(self.runner.version, {**kw, "enable_thinking": self.enable_thinking})

    def _events(self, conversation: list[dict[str, Any]], params: SamplingParams) -> Iterator[TextEvent]:
        """The answer's events; history and ``_last`` are updated before the final event."""
        text = self.runner.text_stream(id0_quirk=self.id0_quirk, thinking=self.enable_thinking)
        stop_ids = {*self.runner.eos_ids, *params.stop_token_ids}
        ids: list[int] = []
        done = False
        for t in self._token_ids(conversation, params):
            if done:
                continue  # beam rows are padded after their end
            ids.append(t)
            event = text.feed(t)
            done = t in stop_ids
            if event.text:
                yield event
        final = text.finish("stop" if done else "length")
        speech = self._speak(ids) if self._speaking else None
        answer = self._finish(conversation, ids)
        self._last = ChatResponse(
            text=answer, content=text.content, reasoning=text.reasoning if self.enable_thinking else None,
            finish_reason="stop" if done else "length", prompt_tokens=self._prompt_tokens,
            completion_tokens=len(ids), token_ids=ids,
            audio_wav=None if speech is None else speech.audio_wav,
            sampling_rate=None if speech is None else speech.sampling_rate)
        yield final

    def _check_speech(self, speak: bool) -> None:
        if speak and getattr(self.runner.model, "tts", None) is None:
            raise FeatureNotAvailableError(f"{self.runner.version.title} checkpoint has no speech head: answers "
                                           "cannot be spoken (generate_audio needs MiniCPM-o 2.6 with init_tts)")

    def _speak(self, ids: list[int]) -> Any:
        """The chat path of ``chat(generate_audio=True)`` for this turn's answer."""
        voice = self._tap.hidden if self._tap is not None else self._voice
        assert voice is not None
        raw = official_answer_text(self.runner.tokenizer, ids, self.runner.eos_ids)
        synth = get_synthesizer(self.model)
        options = limited_options(synth, self.speech_options, self.max_audio_seconds)
        return cut_audio(synth.synthesize(speech_text(raw), voice, options), self.max_audio_seconds)

    def _prepare(self, conversation: list[dict[str, Any]]) -> PreparedBatch:
        thinking = compat.thinking_flag(self.runner.version, self.enable_thinking)
        inputs = self.runner.processor(
            [conversation], system_prompt=self.system_prompt, max_slice_nums=self.max_slice_nums,
            use_image_id=self.use_image_id, enable_thinking=thinking, max_length=self.max_inp_length,
            use_tts_template=self._speaking,
        )
        return self.runner.prepare(inputs, feature_cache=self.features, id0_quirk=self.id0_quirk)

    def _reuse(self, ids: list[int], mask: list[int]) -> int:
        """Crop the cache to the longest prefix shared with ``ids`` (at least one token left new).

        Ids and attention-mask values must both agree: a token's cached keys depend on which
        earlier tokens were visible to it.
        """
        if self._cache is None:
            return 0
        n = 0
        limit = min(len(self._cached_ids), len(ids) - 1)
        while n < limit and self._cached_ids[n] == ids[n] and self._cached_mask[n] == mask[n]:
            n += 1
        self._cache.crop(n)
        self._cached_ids = self._cached_ids[:n]
        self._cached_mask = self._cached_mask[:n]
        return n

    def _token_ids(self, conversation: list[dict[str, Any]], params: SamplingParams) -> Iterator[int]:
        """Token ids of the answer, one at a time, maintaining the KV cache."""
        with torch.inference_mode():
            batch = self._prepare(conversation)
            ids = batch.input_ids[0].tolist()
            self._prompt_tokens = len(ids)
            self._tap = None
            if params.num_beams > 1:
                self._cache, self._cached_ids, self._cached_mask = None, [], []
                if self._speaking:
                    self._voice = speaker_hidden(self.model, batch)
                rows = self.runner.generate_ids(batch, params)
                self.last_prefill_tokens = len(ids)
                yield from rows[0]
                return
            mask = batch.attention_mask[0].tolist()
            reused = self._reuse(ids, mask)
            if self._cache is None:
                self._cache = self.runner.new_cache(1)
            self.last_prefill_tokens = len(ids) - reused
            generated: list[int] = []
            for step in self._steps(batch, params, reused):
                tok = int(step.tokens[0])
                generated.append(tok)
                yield tok
            kept = self._cache.get_seq_length()
            self._cached_ids = (ids + generated)[:kept]
            self._cached_mask = (mask + [1] * len(generated))[:kept]

    def _steps(self, batch: PreparedBatch, params: SamplingParams, reused: int) -> Iterator[StepOutput]:
        """The runner's steps; when speaking, through a tap that reads the voice at <|spk|>."""
        assert self._cache is not None
        if not self._speaking:
            return self.runner.steps(batch, params, self._cache, reused=reused)
        spk = speaker_position(batch.input_ids[0].tolist(), self.runner.tokenizer)
        self._tap = SpeakerTap(self.runner.model, spk - reused)
        return generate_steps(self._tap, batch.inputs_embeds[:, reused:], batch.attention_mask, params,
                              eos_ids=self.runner.eos_ids, cache=self._cache, mode=self.runner.decode_mode)

    def _finish(self, conversation: list[dict[str, Any]], ids: list[int]) -> str:
        answer = compat.thinking_prefix(self.runner.version, self.enable_thinking) + self.runner.postprocess(
            ids, id0_quirk=self.id0_quirk)
        self.history = conversation + [{"role": "assistant", "content": [answer]}]
        return answer
