"""The Gradio page's handlers and rendering, called directly (the browser tests drive the page)."""

from __future__ import annotations

import subprocess
import sys

import gradio as gr  # a [dev] dependency: a missing gradio fails these tests, it does not skip them
import pytest

from minicpmv.engine.stream import TextEvent
from minicpmv.ui.app import Handlers, Partial, answer_messages, build_app, error_status, render
from minicpmv.ui.logic import TabChat, Turn

CONTROLS = ("sampling", 1.0, 1.0, 8, 9, False)  # mode, temperature, top-p, max tokens, max slices, thinking
BEAM = ("beam", 0.7, 0.8, 6, 9, False)


def test_import_loads_no_model_and_no_gradio():
    code = "import sys, minicpmv.ui; print('gradio' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("which", ["shared26", "shared45"])
def test_build_app(which, request):
    shared = request.getfixturevalue(which)
    demo = build_app(shared, max_new_tokens=33)
    assert isinstance(demo, gr.Blocks)
    config = demo.get_config_file()
    by_id = {c.get("props", {}).get("elem_id"): c["props"] for c in config["components"]}
    assert by_id["max-tokens"]["value"] == 33
    assert by_id["thinking"]["interactive"] is shared.supports_thinking
    assert by_id["max-slices"]["value"] == shared.default_max_slices
    assert config["analytics_enabled"] is False


def test_answer_messages_plain():
    assert answer_messages(None, "Hello") == [{"role": "assistant", "content": "Hello"}]
    assert answer_messages(None, "", final=False) == [{"role": "assistant", "content": "…"}]  # waiting
    assert answer_messages(None, "") == [{"role": "assistant", "content": "*(empty answer)*"}]


def test_answer_messages_reasoning_is_collapsed_when_done():
    msgs = answer_messages("look at the roof", "A house.")
    assert msgs[0]["metadata"] == {"title": "Reasoning", "status": "done"}  # status done = collapsed
    assert msgs[0]["content"] == "look at the roof"
    assert msgs[1] == {"role": "assistant", "content": "A house."}


def test_answer_messages_reasoning_streaming():
    msgs = answer_messages("look", "", final=False)
    assert msgs[0]["metadata"]["status"] == "pending" and msgs[1]["content"] == "…"  # open while it streams
    msgs = answer_messages("look", "A", final=False)
    assert msgs[0]["metadata"]["status"] == "done" and msgs[1]["content"] == "A"


def test_answer_messages_stopped_inside_reasoning():
    msgs = answer_messages("look and look", "", finish_reason="length")
    assert msgs[0]["metadata"]["status"] == "done"  # collapsed: the answer is over
    assert "stopped inside the reasoning" in msgs[1]["content"]


def test_render_turns_with_files(house):
    turns = [Turn(text="What?", files=[str(house)], items=[], answer="A house.", content="A house.")]
    partial = Partial(False)
    partial.add(TextEvent(text="It is", content="It is"))
    assert render(turns, Turn(text="More?", files=[], items=[]), partial) == [
        {"role": "user", "content": {"path": str(house)}},
        {"role": "user", "content": "What?"},
        {"role": "assistant", "content": "A house."},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "It is"},
    ]


def test_error_status_escapes_html_and_markdown():
    out = error_status("bad <script>x</script> file_name_*.png")
    assert "<script>" not in out and "_" not in out.removeprefix('<span class="error">') and "*" not in out
    assert out.startswith('<span class="error">Error: ')


def test_submit_streams_then_reports(shared26, house):
    h = Handlers(gr, shared26)
    steps = list(h.submit({"text": "What is it?", "files": [str(house)]}, None, *CONTROLS))
    box, tab, chat, status, audio, recording = steps[0]
    assert box == {"text": "", "files": []} and status == "Generating…" and audio is None and recording is None
    assert isinstance(tab, TabChat) and chat == []
    assert len(steps) >= 3  # cleared box, pending turn, at least one streamed chunk, final
    *_, (box, tab, chat, status, audio, _) = steps
    assert status.startswith("Answered in") and audio == gr.skip()  # not spoken: the player is left alone
    assert [m["role"] for m in chat] == ["user", "user", "assistant"]
    assert chat[2]["content"] == tab.turns[0].answer == tab.turns[0].content


def test_submit_bad_file_keeps_input_and_shows_error(shared26, house, corrupt_png):
    h = Handlers(gr, shared26)
    tab = TabChat(shared26)
    steps = list(h.submit({"text": "q", "files": [str(house), str(corrupt_png)]}, tab, *CONTROLS))
    assert len(steps) == 1
    box, same_tab, chat, status, _, _ = steps[0]
    assert box == gr.skip()  # the user's text and files stay in the box
    assert same_tab is tab and chat == [] and tab.turns == []
    assert "broken&#95;photo.png" in status and "not a recognised image format" in status
    assert "Traceback" not in status


def test_submit_bad_settings_shows_error(shared26):
    h = Handlers(gr, shared26)
    (_, _, _, status, _, _), = h.submit({"text": "q", "files": []}, None, "sampling", 0.0, 1.0, 8, 9, False)
    assert "temperature must be &gt; 0" in status or "temperature must be &#62; 0" in status


def test_regenerate_and_clear(shared26, house):
    h = Handlers(gr, shared26)
    *_, (_, tab, chat, *_) = h.submit({"text": "q", "files": [str(house)]}, None, *BEAM)
    *_, (_, tab2, chat2, status, *_) = h.regenerate(tab, *BEAM)
    assert tab2 is tab and chat2 == chat and status.startswith("Regenerated the last answer in")
    box, tab3, chat3, status3, audio3, recording3 = h.clear(tab)
    assert audio3 is None and recording3 is None
    assert tab3 is tab and tab.turns == [] and chat3 == [] and status3 == ""


def test_regenerate_before_any_question(shared26):
    (_, _, chat, status, *_), = Handlers(gr, shared26).regenerate(None, *CONTROLS)
    assert chat == [] and "no answer to regenerate" in status


def test_thinking_answer_renders_reasoning(shared45, house):
    h = Handlers(gr, shared45)
    *_, (_, tab, chat, status, *_) = h.submit({"text": "q", "files": [str(house)]}, None,
                                              "sampling", 0.7, 0.8, 10, 9, True)
    reasoning = [m for m in chat if m.get("metadata")]
    assert len(reasoning) == 1 and reasoning[0]["metadata"]["title"] == "Reasoning"


def test_few_shot_handlers(shared26, house, small_png):
    h = Handlers(gr, shared26)
    examples, gallery, status = h.add_example([], str(small_png), "Colour?", "Blue.")
    assert examples == [(str(small_png), "Colour?", "Blue.")] and gallery[0][1] == "Q: Colour?\nA: Blue."
    same, _, err = h.add_example(examples, None, "q", "a")
    assert same == examples and "needs an image" in err
    *_, (answer, status) = h.few_shot(examples, str(house), "Colour?", *BEAM)
    assert status == "Done." and answer[0]["role"] == "assistant" and answer[0]["content"]
    (_, status), = h.few_shot(examples, None, "Colour?", *BEAM)
    assert "upload a test image" in status


def test_few_shot_bad_file(shared26, house, corrupt_png):
    h = Handlers(gr, shared26)
    (answer, status), = h.few_shot([(str(corrupt_png), "q", "a")], str(house), "q", *BEAM)
    assert answer == gr.skip() and "broken&#95;photo.png" in status


def test_clear_stops_a_streaming_answer(shared26, house):
    h = Handlers(gr, shared26)
    steps = h.submit({"text": "q", "files": [str(house)]}, None, "sampling", 1.0, 1.0, 40, 9, False)
    next(steps)  # box cleared
    next(steps)  # pending turn shown
    _, tab, *_ = next(steps)  # first streamed chunk: the model lock is held
    assert shared26.lock.locked()
    assert h.clear(tab)[2] == []
    assert list(steps) == []  # the handler stops at once without drawing the old conversation again
    assert not shared26.lock.locked() and tab.turns == []


def test_closing_the_handler_releases_the_model(shared26, house):
    h = Handlers(gr, shared26)
    steps = h.submit({"text": "q", "files": [str(house)]}, None, "sampling", 1.0, 1.0, 40, 9, False)
    for _ in range(3):
        next(steps)
    assert shared26.lock.locked()
    steps.close()  # the browser went away
    assert not shared26.lock.locked()


def test_cli_ui_arguments():
    from minicpmv.cli import build_parser

    args = build_parser().parse_args(["ui", "--model", "m", "--port", "1234", "--max-new-tokens", "7"])
    assert (args.command, args.model, args.port, args.host, args.max_new_tokens) == ("ui", "m", 1234, "127.0.0.1", 7)


def test_cli_ui_bad_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from minicpmv.cli import main

    assert main(["ui", "--model", str(tmp_path), "--port", "1"]) == 2  # fails while loading, before serving
    err = capsys.readouterr().err
    assert err.startswith("minicpmv: error:") and "Traceback" not in err


def test_missing_gradio_is_explained(monkeypatch):
    from minicpmv.errors import MiniCPMVError
    from minicpmv.ui.app import import_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(MiniCPMVError, match=r"pip install 'minicpmv\[ui\]'"):
        import_gradio()
