"""Fuzzing every input family of the library (hypothesis): message shapes, chat templates, image
bytes, video containers and audio clips. Whatever comes in, the answer is a result or a typed
``MiniCPMVError`` (one line, naming the problem), never another exception.

The examples are derandomized (the same ones on every run, so CI is reproducible); what a
wider search found is pinned with ``@example``. Explore further with
``pytest --hypothesis-seed=random`` after setting ``derandomize=False``."""

from __future__ import annotations

import io
import random
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from minicpmv.engine.chat import normalise_msgs
from minicpmv.errors import MiniCPMVError
from minicpmv.processing.audio import AudioFeatureConfig, check_waveform, extract_audio, load_wav
from minicpmv.processing.chat_template import ChatTemplate
from minicpmv.processing.image import load_image
from minicpmv.processing.video import Video
from minicpmv.versions import get_version

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"


def _typed(fn, *args, **kwargs):
    """fn(...) or None when it raised a MiniCPMVError; any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except MiniCPMVError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)  # one line naming the problem
        return None


# ---------------------------------------------------------------------------- message shapes

_images = st.builds(lambda w, h, c: Image.new("RGB", (w, h), c), st.integers(1, 700), st.integers(1, 300),
                    st.tuples(*[st.integers(0, 255)] * 3))
_odd_images = st.builds(lambda mode, w, h: Image.new(mode, (w, h)), st.sampled_from(["L", "RGBA", "P", "1", "I", "F"]),
                        st.integers(1, 64), st.integers(1, 64))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
                     st.binary(max_size=30))
_items = st.one_of(
    st.text(max_size=40), _images, _odd_images, _scalars,
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "video", "audio", "image_url", "x"])},
                          optional={"text": _scalars, "image": st.one_of(_scalars, _images),
                                    "video": _scalars, "audio": _scalars, "fps": _scalars, "max_frames": _scalars}),
    st.lists(st.text(max_size=5), max_size=2),
    st.builds(lambda n: np.zeros(n, np.float32), st.integers(0, 4000)),
)
_roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "USER", ""]), _scalars,
                   st.lists(st.text(max_size=3), max_size=2))
_content = st.one_of(st.text(max_size=60), st.lists(_items, max_size=4), _scalars)
_message = st.one_of(st.fixed_dictionaries({"role": _roles, "content": _content}),
                     st.fixed_dictionaries({"role": _roles}), _scalars, st.lists(_scalars, max_size=2))
_conversation = st.lists(_message, max_size=4)
_msgs = st.one_of(_conversation, st.lists(_conversation, min_size=1, max_size=2), _scalars,
                  st.text(max_size=40).map(lambda s: '[{"role": "user", "content": ' + repr(s) + "}]"))


@FUZZ
@given(msgs=_msgs, image=st.one_of(st.none(), _images, _scalars), system=st.one_of(st.text(max_size=20), _scalars),
       slices=st.one_of(st.none(), st.integers(-2, 12)))
def test_message_shapes(model26, msgs, image, system, slices):
    conversations = _typed(normalise_msgs, msgs, image)
    if conversations is not None:
        out = _typed(model26.processor, conversations, system_prompt=system, max_slice_nums=slices)
        if out is not None:
            assert len(out.input_ids) == len(conversations)
            assert all(isinstance(i, int) for row in out.input_ids for i in row)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(msgs=_conversation, sampling=st.booleans())
def test_message_shapes_through_chat(model26, msgs, sampling):
    """The whole chat() call (prefill and one token) on the same shapes."""
    answer = _typed(model26.chat, msgs, max_new_tokens=1, sampling=sampling, seed=0)
    assert answer is None or isinstance(answer, str)


# ---------------------------------------------------------------------------- chat templates

_TEMPLATES = {v: ChatTemplate(json_source) for v, json_source in (
    (v, __import__("json").loads((CONF / v / "_checkpoint" / "tokenizer_config.json").read_text())["chat_template"])
    for v in ("2.6", "4.5", "o2.6", "2.5"))}
_template_values = st.recursive(st.one_of(_scalars, st.text(max_size=20)),
                                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=3), max_leaves=8)


@FUZZ
@given(version=st.sampled_from(sorted(_TEMPLATES)),
       messages=st.lists(st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), _template_values,
                                         max_size=4), max_size=4),
       kwargs=st.dictionaries(st.sampled_from(["enable_thinking", "add_vision_id", "tools"]), _template_values,
                              max_size=2))
def test_chat_templates_render_or_refuse(version, messages, kwargs):
    out = _typed(_TEMPLATES[version].render, messages, **kwargs)
    assert out is None or isinstance(out, str)


@FUZZ
@given(source=st.one_of(st.text(max_size=80), st.sampled_from(["{{", "{% for %}", "{{ raise_exception('x') }}",
                                                                "{{ messages[99]['x'] }}", "{% if %}{% endif %}",
                                                                "{{ ''.__class__.__mro__ }}", "{{ 1/0 }}"])),
       messages=st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": st.text(max_size=10)}),
                         max_size=2))
@example(source="{{0/0}}", messages=[])  # found by this test: ZeroDivisionError escaped render()
@example(source="{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", messages=[])  # RecursionError
def test_arbitrary_template_sources(source, messages):
    template = _typed(ChatTemplate, source)
    if template is not None:
        out = _typed(template.render, messages)
        assert out is None or isinstance(out, str)


# ---------------------------------------------------------------------------- image bytes


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    img = Image.fromarray(rng.integers(0, 255, (23, 37, 3), dtype=np.uint8))
    (img.convert("P") if fmt == "GIF" else img).save(buf, format=fmt)
    return buf.getvalue()


_IMAGE_FILES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM")}


def _mutate(data: bytes, rnd: random.Random, edits: int) -> bytes:
    b = bytearray(data)
    for _ in range(edits):
        op = rnd.randrange(4)
        if op == 0 and b:  # flip a byte
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 1 and b:  # cut the tail
            del b[rnd.randrange(len(b)):]
        elif op == 2:  # insert junk
            at = rnd.randrange(len(b) + 1)
            b[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 16)))
        elif b:  # overwrite a header-sized run with large numbers (sizes, counts)
            at = rnd.randrange(min(len(b), 64))
            b[at:at + 4] = b"\xff\xff\xff\x7f"
    return bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # Pillow warns, then we refuse
@FUZZ
@given(fmt=st.sampled_from(sorted(_IMAGE_FILES)), seed=st.integers(0, 2**32 - 1), edits=st.integers(0, 6),
       max_pixels=st.sampled_from([10**4, 10**7]))
def test_image_bytes(fmt, seed, edits, max_pixels):
    img = _typed(load_image, _mutate(_IMAGE_FILES[fmt], random.Random(seed), edits), max_pixels=max_pixels)
    if img is not None:
        assert img.mode == "RGB" and img.width * img.height <= max_pixels
        img.tobytes()  # fully decoded


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.binary(max_size=200))
def test_random_bytes_as_images(data):
    assert _typed(load_image, data) is None or True


# ---------------------------------------------------------------------------- video containers


def _clip(container: str, codec: str, frames: int = 6) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as c:
        s = c.add_stream(codec, rate=Fraction(5))
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        for k in range(frames):
            arr = np.full((24, 32, 3), 30 * k, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {"mp4": _clip("mp4", "libx264"), "webm": _clip("webm", "libvpx-vp9"), "avi": _clip("avi", "mpeg4"),
            "mkv": _clip("matroska", "mpeg4")}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["mp4", "webm", "avi", "mkv"]), seed=st.integers(0, 2**32 - 1),
       edits=st.integers(0, 5), version=st.sampled_from(["2.6", "4.5"]),
       options=st.fixed_dictionaries({}, optional={"fps": st.one_of(st.floats(-1, 100), st.integers(0, 3)),
                                                   "max_frames": st.integers(-1, 5),
                                                   "max_pixels": st.integers(1, 2000)}))
def test_video_containers(clips, kind, seed, edits, version, options):
    data = _mutate(clips[kind], random.Random(seed), edits)
    video = _typed(Video, data, **options)
    if video is None:
        return
    frames = _typed(video.expand, get_version(version).video)
    if frames is not None:
        decoded = _typed(list, frames.frames)
        assert decoded is None or all(f.mode == "RGB" for f in decoded)


# ---------------------------------------------------------------------------- audio clips

_dtypes = st.sampled_from(["float32", "float64", "float16", "int16", "int32", "uint8", "complex64", "bool", "object"])


@FUZZ
@given(dtype=_dtypes, shape=st.one_of(st.just([]), st.lists(st.integers(0, 20000), min_size=1, max_size=1),
                                     st.lists(st.integers(0, 40), min_size=2, max_size=3)),
       fill=st.sampled_from([0.0, 0.5, np.nan, np.inf, 1e30]),
       rate=st.one_of(st.none(), st.sampled_from([16000, 8000, 0, -1, 16000.5]), st.text(max_size=4),
                      st.floats(allow_nan=True)))
@example(dtype="float32", shape=[1600], fill=0.0, rate=float("inf"))  # found: OverflowError from int(rate)
@example(dtype="float32", shape=[1600], fill=0.0, rate="")  # found: ValueError from int(rate)
def test_audio_arrays(dtype, shape, fill, rate):
    cfg = AudioFeatureConfig()
    with np.errstate(all="ignore"):
        x = np.full(shape, fill).astype(dtype)
    clip = _typed(check_waveform, x, rate, cfg, "clip")
    if clip is not None:
        assert clip.dtype == np.float32 and clip.ndim == 1 and np.all(np.isfinite(clip))
    items = [{"type": "audio", "audio": x, "sampling_rate": rate}, "what?"]
    _typed(extract_audio, items, cfg)


@FUZZ
@given(channels=st.integers(1, 3), width=st.integers(1, 4), rate=st.integers(1, 96000),
       frames=st.integers(0, 2000), seed=st.integers(0, 2**32 - 1), edits=st.integers(0, 4))
@example(channels=1, width=1, rate=1, frames=20, seed=31, edits=2)  # found: wave raised RuntimeError
def test_wav_files(channels, width, rate, frames, seed, edits):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(random.Random(seed).randrange(256) for _ in range(frames * channels * width)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.wav"
        path.write_bytes(_mutate(buf.getvalue(), random.Random(seed), edits))
        loaded = _typed(load_wav, path)
        if loaded is not None:
            data, got_rate = loaded
            _typed(check_waveform, data, got_rate, AudioFeatureConfig(), "clip")
