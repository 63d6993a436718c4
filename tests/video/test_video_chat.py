"""Videos in messages: conformance through the video path, placeholders, temporal ids, chat, CLI."""

from __future__ import annotations

from dataclasses import replace

import av
import numpy as np
import pytest
from PIL import Image

import minicpmv
from minicpmv.conformance import CaseRunner
from minicpmv.errors import ContextLengthError, InputError
from minicpmv.processing import video as vmod
from minicpmv.processing.processor import Processor
from minicpmv.processing.video import Video, load_video

from .conftest import CONF, read_code, write_video

GREEDY = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=4)


def _case_frames(version: str, case: str) -> tuple[list[Image.Image], str]:
    root = CONF / version / case / "inputs"
    frames = []
    for f in sorted(root.glob("*_frame_*.png")):
        with Image.open(f) as im:
            frames.append(im.convert("RGB"))
    return frames, "Describe the video. What happens in the frames of this video?"


def _run_case(model, version: str, case: str, item, **proc_kwargs) -> None:
    runner = CaseRunner(model, CONF / version / case)
    runner.msgs = [{"role": "user", "content": [item, _case_frames(version, case)[1]]}]
    runner.proc_kwargs.update({"max_slice_nums": None, "use_image_id": None, "temporal_ids": None, **proc_kwargs})
    results = list(runner.run())
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert {"expanded", "input_ids", "slices", "resampler", "greedy_ids"} <= {r.stage for r in results}


# ---------------------------------------------------------------------------- conformance


def test_conformance_26_video_from_frames(model26):
    frames, _ = _case_frames("2.6", "video_4frames_slice1")
    _run_case(model26, "2.6", "video_4frames_slice1", Video(frames, max_slice_nums=1))


def test_conformance_26_video_from_a_lossless_file(model26, tmp_path):
    frames, _ = _case_frames("2.6", "video_4frames_slice1")
    path = write_video(tmp_path / "case.mkv", [np.asarray(f) for f in frames], 1, codec="ffv1", pix_fmt="bgr0")
    # 1 fps file: the 2.6 recipe takes every frame; the call's max_slice_nums=1 applies to the frames
    _run_case(model26, "2.6", "video_4frames_slice1", {"type": "video", "video": str(path)}, max_slice_nums=1)


def test_conformance_45_video_temporal_packing(model45):
    frames, _ = _case_frames("4.5", "video_temporal_2x3")
    video = Video(frames, timestamps=[0.0, 0.3, 0.6, 1.0, 1.3, 1.6], packing=3)
    assert video.expand(model45.version.video).temporal_ids == [[0, 3, 6], [10, 13, 16]]
    _run_case(model45, "4.5", "video_temporal_2x3", video)


# ---------------------------------------------------------------------------- processor


def test_45_video_next_to_an_image(model45):
    frames, _ = _case_frames("4.5", "video_temporal_2x3")
    image = Image.new("RGB", (448, 448), "red")
    video = Video(frames[:3], timestamps=[0.0, 0.3, 0.6], packing=3)
    inputs = model45.processor([[{"role": "user", "content": [image, video, "q"]}]])
    assert inputs.temporal_ids == [[[-1], [0, 3, 6]]]
    assert len(inputs.image_bounds[0]) == 2 and len(inputs.pixel_values[0]) == 4
    text = inputs.expanded_prompts[0]
    assert text.count("<image_id>") == 1 and "<image_id>0</image_id>" in text  # the image keeps its id
    with pytest.raises(InputError, match="temporal_ids cannot be combined"):
        model45.processor([[{"role": "user", "content": [video, "q"]}]], temporal_ids=[[0, 1, 2]])


def test_26_frames_follow_the_video_slicing(model26):
    frame = Image.new("RGB", (896, 504), "blue")  # 3 slices at max_slice_nums=2, 1 at 1
    image = Image.new("RGB", (896, 504), "green")
    msgs = [{"role": "user", "content": [Video([frame] * 2), image, "q"]}]
    inputs = model26.processor([msgs], max_slice_nums=None)  # image: checkpoint default 9
    assert len(inputs.tgt_sizes[0]) == 2 * 3 + 3 and inputs.temporal_ids is None
    assert inputs.expanded_prompts[0].count("<image_id>") == 1  # only the image
    inputs = model26.processor([msgs], max_slice_nums=1)  # an explicit call value applies to frames too
    assert len(inputs.tgt_sizes[0]) == 3
    msgs[0]["content"][0] = Video([frame] * 2, max_slice_nums=2)  # ... unless the video says otherwise
    assert len(model26.processor([msgs], max_slice_nums=1).tgt_sizes[0]) == 7


def test_too_many_frames_for_the_context(model26):
    frame = Image.new("RGB", (896, 504), "blue")  # 3 slices -> about 199 tokens per frame
    msgs = [{"role": "user", "content": [Video([frame] * 64), "q"]}]
    with pytest.raises(ContextLengthError, match="64 frames.*max_frames"):
        model26.processor([msgs])  # 64 * 199 > 8192
    assert model26.processor([msgs], max_length=16000).input_ids[0]


def test_version_without_video_recipe(model26):
    p = model26.processor
    no_video = Processor(p.tokenizer, p.template, replace(p.version, video=None), p.cfg)
    with pytest.raises(InputError, match="no video recipe"):
        no_video([[{"role": "user", "content": [Video([Image.new("RGB", (8, 8))]), "q"]}]])


# ---------------------------------------------------------------------------- chat and session


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("chat") / "clip.mp4", 30, 10)  # 3 s at 10 fps


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_chat_with_a_video_equals_the_official_recipe_call(request, clip, version):
    model = request.getfixturevalue("model26" if version == "2.6" else "model45")
    answer = model.chat([{"role": "user", "content": [{"type": "video", "video": str(clip)}, "Describe"]}],
                        **GREEDY)
    sampled = load_video(clip, version)
    official = dict(use_image_id=False, max_slice_nums=2 if version == "2.6" else 1)
    if version == "4.5":
        official["temporal_ids"] = sampled.temporal_ids
    expected = model.chat([{"role": "user", "content": [*sampled.frames, "Describe"]}], **official, **GREEDY)
    assert answer == expected


def test_session_decodes_and_encodes_the_video_once(model45, clip, monkeypatch):
    session = minicpmv.ChatSession(model45, **GREEDY)
    session.ask([{"type": "video", "video": str(clip)}, "Describe the video."])
    assert isinstance(session.history[0]["content"][0], Video)
    monkeypatch.setattr(vmod, "iter_video_frames", lambda *a, **k: pytest.fail("the video was decoded again"))
    encoded = model45.encoded_entries
    session.ask("And then?")
    assert model45.encoded_entries == encoded  # every frame group came from the feature cache
    assert session.last_prefill_tokens < 100  # of a prompt of 15 frame placeholders (> 1000 tokens)


def test_video_object_in_chat_is_decoded_once(model26, clip, monkeypatch):
    video = Video(clip, fps=2)  # stride round(10 / 2) = 5 -> 6 frames
    model26.chat([{"role": "user", "content": [video, "q"]}], **GREEDY)
    assert [read_code(f) for f in video.expand(model26.version.video).frames] == [0, 5, 10, 15, 20, 25]
    monkeypatch.setattr(vmod, "iter_video_frames", lambda *a, **k: pytest.fail("decoded twice"))
    model26.chat([{"role": "user", "content": [video, "q"]}], **GREEDY)


# ---------------------------------------------------------------------------- CLI


def test_cli_chat_with_video(clip, capsys):
    from minicpmv.cli import main

    ckpt = str(CONF / "4.5" / "_checkpoint")
    code = main(["chat", "--model", ckpt, "--dtype", "float32", "--video", str(clip), "--fps", "2", "--packing", "2",
                 "--greedy", "--max-new-tokens", "3", "Describe the video"])
    assert code == 0 and capsys.readouterr().out.strip()


def test_cli_interactive_video(clip, capsys, monkeypatch):
    import io
    import sys

    from minicpmv.cli import main

    lines = f":video /nonexistent.mp4\n:video {clip}\nDescribe the video\nAnd then?\n:quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", "--model", str(CONF / "2.6" / "_checkpoint"), "--dtype", "float32", "--greedy",
                 "--max-new-tokens", "3", "--max-frames", "2", "-i"])
    out = capsys.readouterr()
    assert code == 0 and "does not exist" in out.err and len(out.out.strip().splitlines()) >= 2


@pytest.mark.parametrize("argv,match", [
    (["--video", "/nonexistent.mp4"], "does not exist"),
    (["--fps", "2"], "apply to --video"),
    (["--video", "CLIP", "--packing", "9"], "limit of 6"),
])
def test_cli_video_errors(clip, capsys, argv, match):
    from minicpmv.cli import main

    argv = [str(clip) if a == "CLIP" else a for a in argv]
    code = main(["chat", "--model", str(CONF / "4.5" / "_checkpoint"), "--dtype", "float32", *argv, "q"])
    assert code == 2 and match in capsys.readouterr().err


def test_public_exports():
    assert minicpmv.Video is Video and minicpmv.load_video is load_video
    assert issubclass(minicpmv.VideoError, minicpmv.InputError)
    assert av.__version__
