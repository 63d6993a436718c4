"""The Gradio page of ``minicpmv ui``: chat with images (and video, audio), decoding controls, few-shot.

MiniCPM-o: a microphone / audio-file question box, audio files in the chat input, and a
"Speech" panel (spoken answers on or off, the default voice or a reference clip cloned as an
assistant or a role-play character); the spoken answer plays in the page when it is ready.

``build_app(shared)`` lays out the page and wires its events to ``logic.py``; ``launch(...)``
loads the model once and serves the page on the local machine (never a public share link,
analytics off, no assets from the internet). Each browser tab keeps its own ``TabChat`` in a
``gr.State``, so tabs never see each other's history; the one model is shared: events that
run it queue in one gradio concurrency group (and ``SharedModel`` holds a lock around it).
Errors caused by the user (bad files, bad settings) are shown in the page's status line, never
as a stack trace. This module imports gradio; ``import minicpmv`` does not import it.
"""

from __future__ import annotations

import html
import logging
import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from ..engine.stream import TextEvent
from ..errors import MiniCPMVError
from .logic import PageOptions, SharedModel, TabChat, Turn, VoiceChoice, page_options, video_supported, voice_choice

log = logging.getLogger(__name__)

MODEL_QUEUE = "model"  # gradio concurrency group of every event that runs the model
DECODING_CHOICES = [("Sampling", "sampling"), ("Beam search", "beam")]
CSS = """
#status { min-height: 1.6em; }
#status .error { color: #b91c1c; font-weight: 600; }
"""


def import_gradio() -> Any:
    """Import gradio with analytics off; a clear error when the ``[ui]`` extra is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise MiniCPMVError("the web UI needs gradio: pip install 'minicpmv[ui]'") from e
    return gr


# ---------------------------------------------------------------------- rendering
STOPPED_IN_REASONING = "*(The answer stopped inside the reasoning: raise “Max new tokens”.)*"


class Partial:
    """An answer as it streams in: reasoning (thinking mode) and answer text so far."""

    def __init__(self, thinking: bool) -> None:
        self.reasoning: str | None = "" if thinking else None
        self.content = ""
        self.finish_reason: str | None = None

    def add(self, event: TextEvent) -> None:
        if self.reasoning is not None:
            self.reasoning += event.reasoning
        self.content += event.content
        self.finish_reason = event.finish_reason or self.finish_reason


def answer_messages(reasoning: str | None, content: str, *, final: bool = True,
                    finish_reason: str | None = None) -> list[dict[str, Any]]:
    """An assistant answer as chatbot messages; thinking-mode reasoning goes in a block of its own.

    The reasoning block is open while it streams and collapsed (status "done") once the answer
    has begun or is final.
    """
    out: list[dict[str, Any]] = []
    if reasoning is not None:
        status = "done" if content or final else "pending"
        out.append({"role": "assistant", "content": reasoning or "…",
                    "metadata": {"title": "Reasoning", "status": status}})
        if final and not content and finish_reason == "length":
            out.append({"role": "assistant", "content": STOPPED_IN_REASONING})
            return out
    if content or reasoning is None or not final:
        out.append({"role": "assistant", "content": content or ("*(empty answer)*" if final else "…")})
    return out


def turn_messages(turn: Turn, partial: Partial | None = None) -> list[dict[str, Any]]:
    """User files and text of one turn, then its answer (``partial``: a streaming one)."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": {"path": f}} for f in turn.files]
    if turn.text.strip():
        msgs.append({"role": "user", "content": turn.text})
    if partial is None:
        return msgs + answer_messages(turn.reasoning, turn.content, finish_reason=turn.finish_reason)
    return msgs + answer_messages(partial.reasoning, partial.content, final=False)


def render(turns: list[Turn], pending: Turn | None = None, partial: Partial | None = None) -> list[dict[str, Any]]:
    msgs = [m for t in turns for m in turn_messages(t)]
    return msgs + (turn_messages(pending, partial or Partial(False)) if pending is not None else [])


_MD_ESCAPES = {c: f"&#{ord(c)};" for c in "\\`*_[]<>&|~"}


def error_status(e: BaseException | str) -> str:
    """A one-line error for the status line (HTML and Markdown in the message are escaped)."""
    text = "".join(_MD_ESCAPES.get(c, html.escape(c)) for c in str(e))
    return f'<span class="error">Error: {text}</span>'


def _options(shared: SharedModel, mode: str, temperature: float, top_p: float, max_tokens: float,
             max_slices: float, thinking: bool) -> PageOptions:
    return page_options(shared.model.version, mode=mode, temperature=float(temperature), top_p=float(top_p),
                        max_new_tokens=int(max_tokens), max_slice_nums=int(max_slices), thinking=bool(thinking))


N_CONTROLS = 6  # decoding controls; then the speech controls (speak, voice, reference clip)


def _split(shared: SharedModel, values: tuple) -> tuple[PageOptions, VoiceChoice]:
    """(decoding options, voice) of the handler's values (the speech controls may be left out)."""
    speak, voice, reference = (*values[N_CONTROLS : N_CONTROLS + 3], False, None, None)[:3]
    return _options(shared, *values[:N_CONTROLS]), voice_choice(bool(speak), voice or "default", reference)


def played(turn: Turn | None) -> Any:
    """A spoken answer as the page's player takes it: (rate, 16-bit samples), or None."""
    if turn is None or turn.audio is None:
        return None
    import numpy as np

    rate, wav = turn.audio
    return rate, np.round(np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16)


# ---------------------------------------------------------------------- handlers
class Handlers:
    """Event handlers of the page; every generator yields (input box, tab state, chatbot, status,
    spoken answer, audio question)."""

    def __init__(self, gr: Any, shared: SharedModel) -> None:
        self.gr = gr
        self.shared = shared

    def _stream(
        self, tab: TabChat, stream: Generator[TextEvent, None, None], base: list[Turn], pending: Turn,
        thinking: bool, done: str = "Answered", speak: bool = False,
    ) -> Iterator[tuple]:
        skip, partial, t0, epoch = self.gr.skip(), Partial(thinking), time.perf_counter(), tab.epoch
        yield skip, tab, render(base, pending, partial), "Generating…", skip, skip
        try:
            for event in stream:
                if tab.epoch != epoch:  # "Clear" was pressed: stop generating, show nothing more
                    return  # (the finally below closes the stream, which releases the model lock)
                partial.add(event)
                yield skip, tab, render(base, pending, partial), "Generating…", skip, skip
        except MiniCPMVError as e:
            yield skip, tab, render(tab.turns), error_status(e), skip, skip
            return
        except Exception as e:  # a bug: keep the page usable, log the traceback on the server
            log.exception("generation failed")
            yield skip, tab, render(tab.turns), error_status(f"internal error ({type(e).__name__}): {e}"), skip, skip
            return
        finally:
            stream.close()  # also when the browser goes away and this handler is closed
        audio = played(tab.turns[-1] if tab.turns else None) if speak else skip
        yield skip, tab, render(tab.turns), f"{done} in {time.perf_counter() - t0:.1f} s.", audio, skip

    def submit(self, message: dict[str, Any] | None, tab: TabChat | None, *values: Any) -> Iterator[tuple]:
        tab = tab if tab is not None else TabChat(self.shared)
        skip = self.gr.skip()
        message = message or {}
        text, files = str(message.get("text") or ""), list(message.get("files") or [])
        recording = values[N_CONTROLS + 3] if len(values) > N_CONTROLS + 3 else None
        files += [recording] if recording else []
        try:
            options, voice = _split(self.shared, values)
            stream = tab.ask(text, files, options, voice)
        except MiniCPMVError as e:
            yield skip, tab, render(tab.turns), error_status(e), skip, skip
            return
        yield {"text": "", "files": []}, tab, render(tab.turns), "Generating…", None, None
        pending = Turn(text=text, files=[str(f) for f in files], items=[])
        yield from self._stream(tab, stream, list(tab.turns), pending, options.thinking, speak=voice.speak)

    def regenerate(self, tab: TabChat | None, *values: Any) -> Iterator[tuple]:
        tab = tab if tab is not None else TabChat(self.shared)
        skip = self.gr.skip()
        try:
            options, voice = _split(self.shared, values)
            stream = tab.regenerate(options, voice)
        except MiniCPMVError as e:
            yield skip, tab, render(tab.turns), error_status(e), skip, skip
            return
        yield from self._stream(tab, stream, tab.turns[:-1], tab.turns[-1], options.thinking,
                                done="Regenerated the last answer", speak=voice.speak)

    def clear(self, tab: TabChat | None) -> tuple:
        if tab is not None:
            tab.clear()
        return {"text": "", "files": []}, tab, [], "", None, None

    def add_example(self, examples: list, image: str | None, question: str, answer: str) -> tuple:
        if not image or not question.strip() or not answer.strip():
            return examples, _gallery(examples), error_status("an example needs an image, a question and an answer")
        examples = [*examples, (image, question.strip(), answer.strip())]
        return examples, _gallery(examples), f"{len(examples)} example(s)."

    def few_shot(self, examples: list, image: str | None, question: str, *controls: Any) -> Iterator[tuple]:
        if not image:
            yield self.gr.skip(), error_status("upload a test image")
            return
        stream = None
        try:
            options = _options(self.shared, *controls)
            partial = Partial(options.thinking)
            stream = self.shared.few_shot(examples, image, question or "", options)
            yield [], "Generating…"
            for event in stream:
                partial.add(event)
                yield answer_messages(partial.reasoning, partial.content, final=False), "Generating…"
        except MiniCPMVError as e:
            yield self.gr.skip(), error_status(e)
            return
        except Exception as e:  # a bug: keep the page usable, log the traceback on the server
            log.exception("few-shot generation failed")
            yield self.gr.skip(), error_status(f"internal error ({type(e).__name__}): {e}")
            return
        finally:
            if stream is not None:
                stream.close()  # releases the model lock if the browser went away
        yield answer_messages(partial.reasoning, partial.content, finish_reason=partial.finish_reason), "Done."


def _gallery(examples: list) -> list[tuple[str, str]]:
    return [(img, f"Q: {q}\nA: {a}") for img, q, a in examples]


# ---------------------------------------------------------------------- layout
def _controls(gr: Any, shared: SharedModel, max_new_tokens: int) -> list[Any]:
    with gr.Accordion("Decoding", open=True):
        mode = gr.Radio(DECODING_CHOICES, value="sampling", label="Decoding", elem_id="decoding")
        temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p", elem_id="top-p")
        max_tokens = gr.Slider(1, 8192, value=max_new_tokens, step=1, label="Max new tokens", elem_id="max-tokens")
        max_slices = gr.Slider(1, 36, value=shared.default_max_slices, step=1, label="Max slices per image",
                               elem_id="max-slices")
        thinking = gr.Checkbox(
            value=False, label="Thinking mode", elem_id="thinking", interactive=shared.supports_thinking,
            info=None if shared.supports_thinking else f"MiniCPM-V {shared.version_name} has no thinking mode",
        )
    mode.change(lambda m: (gr.update(interactive=m == "sampling"),) * 2, mode, [temperature, top_p])
    return [mode, temperature, top_p, max_tokens, max_slices, thinking]


def _speech_controls(gr: Any, shared: SharedModel) -> list[Any]:
    """Spoken answers and the voice (MiniCPM-o; hidden for models without audio)."""
    with gr.Accordion("Speech", open=True, visible=shared.takes_audio):
        speak = gr.Checkbox(value=False, label="Spoken answer", elem_id="speak", interactive=shared.speaks,
                            info=None if shared.speaks else "this model has no speech head")
        voice = gr.Radio([("Default voice", "default"), ("Clone the reference clip", "clone"),
                          ("Role-play the reference clip", "roleplay")], value="default", label="Voice",
                         elem_id="voice")
        reference = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Reference clip (voice cloning)",
                             elem_id="voice-ref")
    return [speak, voice, reference]


def _chat_tab(gr: Any, h: Handlers, controls: list[Any]) -> None:
    tab = gr.State(None)  # this browser tab's TabChat, created on its first question
    audio_in = h.shared.takes_audio
    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=520, buttons=["copy"])
    answer_audio = gr.Audio(label="Spoken answer", autoplay=True, interactive=False, elem_id="answer-audio",
                            visible=h.shared.speaks)
    status = gr.Markdown("", elem_id="status")
    kinds = "images or a video" if video_supported() else "images (video is not supported yet)"
    kinds += ", audio" if audio_in else ""
    box = gr.MultimodalTextbox(
        placeholder=f"Attach {kinds}, type a question, press Enter", file_count="multiple",
        file_types=["image", "video", "audio"] if audio_in else ["image", "video"], show_label=False,
        elem_id="input", sources=["upload"],
    )
    recording = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Audio question (sent with "
                         "the next message)", elem_id="audio-in", visible=audio_in)
    with gr.Row():
        regen = gr.Button("Regenerate", elem_id="regenerate")
        clear = gr.Button("Clear", elem_id="clear")
    outputs = [box, tab, chatbot, status, answer_audio, recording]
    # Events that run the model share one queue slot (the model is shared); Clear runs at once.
    box.submit(h.submit, [box, tab, *controls, recording], outputs, concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    regen.click(h.regenerate, [tab, *controls], outputs, concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    clear.click(h.clear, [tab], outputs, queue=False)
    chatbot.clear(h.clear, [tab], outputs, queue=False)  # the chatbot's own trash button


def _few_shot_tab(gr: Any, h: Handlers, controls: list[Any]) -> None:
    examples = gr.State([])
    gr.Markdown("Add example image + question + answer pairs, then ask about a new image: the model "
                "sees the examples as earlier turns of the conversation.")
    with gr.Row():
        with gr.Column():
            ex_image = gr.Image(type="filepath", label="Example image", sources=["upload"], height=200,
                                elem_id="fs-ex-image")
            ex_question = gr.Textbox(label="Example question", elem_id="fs-ex-question")
            ex_answer = gr.Textbox(label="Expected answer", elem_id="fs-ex-answer")
            with gr.Row():
                add = gr.Button("Add example", elem_id="fs-add")
                clear = gr.Button("Clear examples")
            gallery = gr.Gallery(label="Examples", columns=4, height="auto", object_fit="contain",
                                 allow_preview=False, elem_id="fs-gallery")
        with gr.Column():
            image = gr.Image(type="filepath", label="Test image", sources=["upload"], height=200, elem_id="fs-image")
            question = gr.Textbox(label="Question", elem_id="fs-question")
            ask = gr.Button("Ask", variant="primary", elem_id="fs-ask")
            answer = gr.Chatbot(label="Answer", height=260, elem_id="fs-answer", buttons=["copy"])
            status = gr.Markdown("", elem_id="fs-status")
    add.click(h.add_example, [examples, ex_image, ex_question, ex_answer], [examples, gallery, status])
    clear.click(lambda: ([], [], ""), None, [examples, gallery, status], queue=False)
    ask.click(h.few_shot, [examples, image, question, *controls], [answer, status],
              concurrency_id=MODEL_QUEUE, concurrency_limit=1)


def build_app(shared: SharedModel, *, max_new_tokens: int = 1024, title: str | None = None) -> Any:
    """The page as a ``gr.Blocks`` (not launched)."""
    gr = import_gradio()
    h = Handlers(gr, shared)
    name = title or f"MiniCPM-V {shared.version_name}"
    with gr.Blocks(title=name, analytics_enabled=False) as demo:
        gr.Markdown(f"## {name}\nModel: `{shared.model.path}`")
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                controls = _controls(gr, shared, max_new_tokens)
                speech = _speech_controls(gr, shared)
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Chat"):
                        _chat_tab(gr, h, [*controls, *speech])
                    with gr.Tab("Few-shot"):
                        _few_shot_tab(gr, h, controls)
    return demo


def theme(gr: Any) -> Any:
    """The default theme with system fonts (no font download from the internet)."""
    sans = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "monospace"]
    return gr.themes.Default(font=sans, font_mono=mono)


def launch(
    model: str | Path,
    *,
    port: int = 7860,
    host: str = "127.0.0.1",
    dtype: str = "bfloat16",
    device: str = "cpu",
    max_new_tokens: int = 1024,
    max_audio_seconds: float | None = None,
) -> None:
    """Load ``model`` once and serve the page at http://HOST:PORT until interrupted."""
    gr = import_gradio()
    shared = SharedModel.load(model, dtype=dtype, device=device, max_audio_seconds=max_audio_seconds)
    demo = build_app(shared, max_new_tokens=max_new_tokens)
    demo.queue().launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
        show_error=True, theme=theme(gr), css=CSS, max_file_size="200mb", pwa=False, mcp_server=False,
    )
