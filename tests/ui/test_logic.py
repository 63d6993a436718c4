"""The browser-independent UI logic: uploads, page options, per-tab chats (answers as text events)."""

from __future__ import annotations

import threading

import pytest

from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import FeatureNotAvailableError, ImageError, InputError, VideoError
from minicpmv.ui import logic
from minicpmv.ui.logic import PageOptions, TabChat, page_options, read_upload, read_uploads, video_supported
from minicpmv.versions import get_version

V26, V45 = get_version("2.6"), get_version("4.5")

GREEDY_KW = dict(mode="sampling", temperature=1.0, top_p=1.0, max_new_tokens=12)


# ------------------------------------------------------------------ uploads
def test_read_upload_image(house):
    img = read_upload(house)
    assert img.mode == "RGB" and img.size[0] > 0


def test_read_uploads_keeps_order(house, small_png):
    a, b = read_uploads([small_png, house])
    assert a.size == (40, 30) and b.size != (40, 30)


def test_corrupt_upload_names_the_file_not_the_server_path(corrupt_png):
    with pytest.raises(ImageError) as e:
        read_upload(corrupt_png)
    msg = str(e.value)
    assert "'broken_photo.png'" in msg and "not a recognised image format" in msg
    assert str(corrupt_png.parent) not in msg


def test_missing_upload(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        read_upload(tmp_path / "gone.jpg")


def test_video_upload_without_video_support(tmp_path, monkeypatch):
    monkeypatch.setattr(logic, "_video_class", lambda: None)
    clip = tmp_path / "clip.MP4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert not logic.video_supported()
    with pytest.raises(FeatureNotAvailableError, match="clip.MP4: video input is not supported yet"):
        read_upload(clip)


def test_video_upload_is_probed_not_decoded(clip_mp4):
    assert video_supported()
    video = read_upload(clip_mp4)
    assert type(video).__name__ == "Video"
    assert video.info().num_frames == 8


def test_corrupt_video_names_the_file(tmp_path):
    bad = tmp_path / "holiday.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing useful")
    with pytest.raises(VideoError) as e:
        read_upload(bad)
    assert "'holiday.mp4'" in str(e.value) and str(tmp_path) not in str(e.value)


# ------------------------------------------------------------------ page options
def DecodingOptions(**kw) -> PageOptions:  # noqa: N802 - the page's controls, as the handlers read them
    return page_options(V26 if not kw.get("thinking") else V45, **kw)


def test_sampling_controls_become_the_official_preset_with_overrides():
    opts = page_options(V26, mode="sampling", temperature=0.3, top_p=0.5, max_new_tokens=7)
    want = SamplingParams.from_official(V26, max_new_tokens=7, overrides={"temperature": 0.3, "top_p": 0.5})
    assert opts.params == want and (opts.params.temperature, opts.params.top_p, opts.params.top_k) == (0.3, 0.5, 100)


def test_thinking_sampling_sets_only_temperature(caplog):
    opts = page_options(V45, temperature=0.6, top_p=0.5, thinking=True)
    assert (opts.params.temperature, opts.params.top_p, opts.thinking) == (0.6, 1.0, True)
    assert "ignoring" not in caplog.text  # top-p is not even offered to the thinking preset
    assert page_options(V26, top_p=0.5, thinking=True).params.top_p == 0.5  # no thinking on 2.6
    assert page_options(V26, thinking=True).thinking is False


def test_beam_controls_are_the_official_beam_preset():
    opts = page_options(V26, mode="beam", temperature=0.3, max_new_tokens=9)
    assert opts.params == SamplingParams.from_official(V26, sampling=False, max_new_tokens=9)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="greedy"), "decoding mode"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_slice_nums=0), "max slices"),
])
def test_bad_options(kw, match):
    with pytest.raises(InputError, match=match):
        page_options(V26, **kw)


def test_beam_ignores_temperature_validation():
    assert page_options(V26, mode="beam", temperature=0.0).params.num_beams == 3


# ------------------------------------------------------------------ per-tab chats
def _drain(stream) -> str:
    return "".join(e.text for e in stream)


def test_ask_streams_the_answer_and_records_the_turn(shared26, house):
    tab = TabChat(shared26)
    opts = DecodingOptions(**GREEDY_KW)
    text = _drain(tab.ask("What is this?", [house], opts))
    assert len(tab.turns) == 1
    turn = tab.turns[0]
    assert turn.text == "What is this?" and turn.files == [str(house)]
    assert turn.answer == text and text  # the streamed text is the answer, stripped as chat() strips it
    assert (turn.content, turn.reasoning) == (text, None)
    assert [m["role"] for m in tab.session.history] == ["user", "assistant"]


def test_bad_file_raises_before_anything_runs(shared26, corrupt_png, house):
    tab = TabChat(shared26)
    with pytest.raises(ImageError):
        tab.ask("hi", [house, corrupt_png], DecodingOptions(**GREEDY_KW))
    assert tab.turns == [] and tab.session is None


def test_empty_turn_is_refused(shared26):
    with pytest.raises(InputError, match="type a question"):
        TabChat(shared26).ask("   ", [], DecodingOptions())


def test_tabs_keep_separate_histories(shared26, house, small_png):
    a, b = TabChat(shared26), TabChat(shared26)
    opts = DecodingOptions(**GREEDY_KW)
    _drain(a.ask("alpha", [house], opts))
    _drain(b.ask("beta", [small_png], opts))
    _drain(a.ask("alpha again", [], opts))
    assert [t.text for t in a.turns] == ["alpha", "alpha again"]
    assert [t.text for t in b.turns] == ["beta"]
    assert len(a.session.history) == 4 and len(b.session.history) == 2
    assert a.session is not b.session


def test_concurrent_tabs_match_sequential_answers(shared26, house, small_png):
    """Two tabs generating from two threads (the lock serialises them) get their own answers."""
    opts = DecodingOptions(mode="beam", max_new_tokens=8)
    want = {q: _drain(TabChat(shared26).ask(q, [f], opts)) for q, f in (("one", house), ("two", small_png))}
    tabs = {"one": (TabChat(shared26), house), "two": (TabChat(shared26), small_png)}
    got: dict[str, str] = {}

    def run(q: str) -> None:
        tab, f = tabs[q]
        got[q] = _drain(tab.ask(q, [f], opts))

    threads = [threading.Thread(target=run, args=(q,)) for q in tabs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_regenerate_replaces_the_last_answer(shared26, house):
    tab = TabChat(shared26)
    first = _drain(tab.ask("Describe it.", [house], DecodingOptions(mode="beam", max_new_tokens=8)))
    again = _drain(tab.regenerate(DecodingOptions(mode="beam", max_new_tokens=8)))
    assert again == first  # beam search is deterministic
    assert len(tab.turns) == 1 and len(tab.session.history) == 2
    other = _drain(tab.regenerate(DecodingOptions(mode="beam", max_new_tokens=3)))
    assert tab.turns[0].answer == other and tab.session.history[-1]["content"] == [other]


def test_regenerate_without_turns(shared26):
    with pytest.raises(InputError, match="nothing|no answer"):
        TabChat(shared26).regenerate(DecodingOptions())


def test_abandoned_stream_leaves_the_conversation_unchanged(shared26, house):
    tab = TabChat(shared26)
    opts = DecodingOptions(**GREEDY_KW)
    _drain(tab.ask("first", [house], opts))
    history = list(tab.session.history)
    stream = tab.ask("second", [], DecodingOptions(mode="sampling", max_new_tokens=40))
    next(stream)
    stream.close()  # the browser went away half-way
    assert len(tab.turns) == 1 and tab.session.history == history
    assert not shared26.lock.locked()
    regen = tab.regenerate(opts)
    next(regen)
    regen.close()
    assert tab.session.history == history and len(tab.turns) == 1
    # and the tab still works afterwards
    _drain(tab.ask("third", [], opts))
    assert [t.text for t in tab.turns] == ["first", "third"]


def test_clear(shared26, house):
    tab = TabChat(shared26)
    _drain(tab.ask("q", [house], DecodingOptions(**GREEDY_KW)))
    tab.clear()
    assert tab.turns == [] and tab.session is None and tab.epoch == 1


def test_thinking_answer_is_split_into_reasoning_and_answer(shared45, house):
    tab = TabChat(shared45)
    events = list(tab.ask("Think.", [house], DecodingOptions(max_new_tokens=6, thinking=True)))
    turn = tab.turns[0]
    assert turn.answer.startswith("<think>\n") and turn.reasoning is not None
    assert "".join(e.reasoning for e in events) == turn.reasoning
    assert "".join(e.content for e in events) == turn.content
    assert tab.session.enable_thinking is True


def test_thinking_is_ignored_for_versions_without_it(shared26, house):
    tab = TabChat(shared26)
    text = _drain(tab.ask("Think.", [house], page_options(V26, max_new_tokens=4, thinking=True)))
    assert not text.startswith("<think>") and tab.session.enable_thinking is False
    assert tab.turns[0].reasoning is None


def test_max_slices_reaches_the_session(shared26, house):
    tab = TabChat(shared26)
    _drain(tab.ask("q", [house], DecodingOptions(max_new_tokens=2, max_slice_nums=1)))
    one = tab.session.last_prefill_tokens
    tab2 = TabChat(shared26)
    _drain(tab2.ask("q", [house], DecodingOptions(max_new_tokens=2, max_slice_nums=9)))
    assert tab.session.max_slice_nums == 1 and tab2.session.last_prefill_tokens > one


def test_few_shot_streams_an_answer(shared26, house, small_png):
    opts = DecodingOptions(mode="beam", max_new_tokens=6)
    text = _drain(shared26.few_shot([(str(small_png), "Colour?", "Blue.")], house, "Colour?", opts))
    plain = shared26.model.chat(
        [{"role": "user", "content": [read_upload(small_png), "Colour?"]},
         {"role": "assistant", "content": ["Blue."]},
         {"role": "user", "content": [read_upload(house), "Colour?"]}],
        sampling=False, max_new_tokens=6, max_slice_nums=None,
    )
    assert text == plain


def test_few_shot_bad_example_file(shared26, house, corrupt_png):
    with pytest.raises(ImageError, match="broken_photo.png"):
        shared26.few_shot([(str(corrupt_png), "q", "a")], house, "q", DecodingOptions())


def test_clear_while_an_answer_streams(shared26, house):
    tab = TabChat(shared26)
    opts = DecodingOptions(**GREEDY_KW)
    _drain(tab.ask("old", [house], opts))
    stream = tab.ask("still streaming", [], DecodingOptions(mode="sampling", max_new_tokens=20))
    next(stream)
    tab.clear()
    _drain(stream)  # the old answer runs to its end ...
    assert tab.turns == [] and tab.session is None  # ... and is not added to the new conversation
    assert not shared26.lock.locked()
    _drain(tab.ask("new", [], opts))
    assert [t.text for t in tab.turns] == ["new"] and len(tab.session.history) == 2
