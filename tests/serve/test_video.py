"""Video over the API: a ``video_url`` part (data: URL of an mp4 made here with PyAV) is sampled
with the model card's recipe (4.5: temporal packing) and answered like the library's own video
item; the server's frame cap applies; a corrupt video is a 400."""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import av
import numpy as np
import pytest

from .conftest import NAME, LiveServer

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "id0_quirk": False}


def _video(frames: int = 10, fps: int = 10, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _messages(data: bytes) -> list[dict]:
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}]


@pytest.mark.parametrize("which", ["2.6", "4.5"])
def test_video_url_matches_library_video_item(which, server26, server45, model26, model45):
    server, model = (server26, model26) if which == "2.6" else (server45, model45)
    data = _video()
    client = server.client()
    resp = client.chat.completions.create(model=NAME, messages=_messages(data), max_tokens=8, temperature=0)
    conv = [{"role": "user", "content": [{"type": "video", "video": data}, "What happens?"]}]
    expected = model.chat(conv, max_new_tokens=8, **GREEDY)  # the served text is chat()'s answer, exactly
    assert expected and resp.choices[0].message.content == expected
    inputs = model.processor([conv], enable_thinking=False if which == "4.5" else None, max_length=10**6)
    assert resp.usage.prompt_tokens == len(inputs.input_ids[0])
    if which == "4.5":
        assert inputs.temporal_ids is not None and len(inputs.image_hashes[0]) == 5  # 5 fps recipe: 5 frames
    chunks = client.chat.completions.create(model=NAME, messages=_messages(data), max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == resp.choices[0].message.content


def test_frame_cap_and_corrupt_video(model26):
    data = _video(frames=20, fps=2)  # 10 s at 2 fps: the 2.6 recipe keeps 10 frames (1 per second)
    with LiveServer(model26, max_video_frames=3) as srv:
        resp = srv.client().chat.completions.create(model=NAME, messages=_messages(data), max_tokens=4,
                                                    temperature=0)
        capped = [{"role": "user", "content": [{"type": "video", "video": data, "max_frames": 3}, "What happens?"]}]
        inputs = model26.processor([capped], max_length=10**6)
        assert len(inputs.image_hashes[0]) == 3
        assert resp.usage.prompt_tokens == len(inputs.input_ids[0])
        bad = srv.post({"model": NAME, "messages": _messages(b"\x00\x00\x00\x18ftypmp42 truncated"), "max_tokens": 2})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == "messages"
        srv.wait_idle()


def test_video_frames_follow_the_pixel_limit(model26):
    """--max-pixels applies to decoded video frames as it does to images (64x48 = 3072 pixels)."""
    data = _video(frames=4, fps=2)
    with LiveServer(model26, max_pixels=3071) as srv:
        resp = srv.post({"model": NAME, "messages": _messages(data), "max_tokens": 2})
        assert resp.status_code == 400, resp.text
        assert "3072 pixels" in resp.json()["error"]["message"]
        srv.wait_idle()
    with LiveServer(model26, max_pixels=3072) as srv:
        assert srv.post({"model": NAME, "messages": _messages(data), "max_tokens": 2}).status_code == 200
