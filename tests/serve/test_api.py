"""The server driven by the official ``openai`` client: text, images, streaming, thinking, n,
stop strings, seeds, usage, defaults, /v1/models and /health.

Greedy answers are compared, exactly, with the library's own ``ChatModel.chat`` stream (same
prompt, greedy, id-0 quirk off as the server does, not stripped: both are the decoded tokens), so
the request conversion is checked end to end.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import NAME, image_part, random_image

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "id0_quirk": False}


def _chat_text(model, messages, *, max_new_tokens, system_prompt="", enable_thinking=False) -> str:
    """The library's greedy chat() answer: what the server must serve, exactly (tests/serve/test_parity.py)."""
    text = model.chat(messages, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
                      enable_thinking=enable_thinking, **GREEDY)
    assert text  # an empty answer would make the comparisons below vacuous
    return text


def _stream_text(stream) -> tuple[str, str, list[str | None], object]:
    content, reasoning, finishes, usage = [], [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            finishes.append(choice.finish_reason)
    return "".join(content), "".join(reasoning), [f for f in finishes if f], usage


def test_models_and_health(server45):
    models = server45.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    health = httpx.get(f"{server45.url}/health").json()
    assert health["status"] == "ok" and health["max_model_len"] == 1024


@pytest.mark.parametrize("which", ["2.6", "4.5"])
def test_text_only_matches_library_chat(which, server26, server45, model26, model45):
    server, model = (server26, model26) if which == "2.6" else (server45, model45)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there!"}]
    resp = server.client().chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    expected = _chat_text(model, [messages[1]], max_new_tokens=12, system_prompt="Answer briefly.")
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason in ("length", "stop")
    prompt = model.processor([[messages[1]]], system_prompt="Answer briefly.",
                             enable_thinking=False if which == "4.5" else None)
    assert resp.usage.prompt_tokens == len(prompt.input_ids[0])
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_one_image_stream_equals_non_stream_and_chat(server45, model45):
    img = random_image(1)
    messages = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "What is this?"}]}]
    client = server45.client()
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, reasoning, finishes, usage = _stream_text(stream)
    assert text == full.choices[0].message.content and reasoning == ""
    assert finishes == [full.choices[0].finish_reason]
    assert usage.completion_tokens == full.usage.completion_tokens and usage.prompt_tokens > 64
    expected = _chat_text(model45, [{"role": "user", "content": [img, "What is this?"]}], max_new_tokens=10)
    assert text == expected


def test_several_images_and_history(server26, model26):
    a, b = random_image(2, (500, 300)), random_image(3, (200, 200))
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, image_part(a), image_part(b)]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "How?"}]},
    ]
    resp = server26.client().chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    expected = _chat_text(model26, [{"role": "user", "content": ["Compare", a, b]},
                                    {"role": "assistant", "content": ["They differ."]},
                                    {"role": "user", "content": ["How?"]}], max_new_tokens=8)
    assert resp.choices[0].message.content == expected


def test_thinking_on_returns_reasoning_separately(server45, model45):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    client = server45.client()
    on = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    off = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    library = _chat_text(model45, messages, max_new_tokens=12, enable_thinking=True)
    assert library.startswith("<think>\n")
    body = library[len("<think>\n"):]
    reasoning, end, content = body.partition("</think>")
    # engine/stream.py (ReasoningSplitter): newlines next to </think> are dropped; an answer cut off
    # before it is all reasoning
    want = (reasoning.rstrip("\n"), content.lstrip("\n")) if end else (body, "")
    assert (on.choices[0].message.reasoning_content, on.choices[0].message.content or "") == want
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.choices[0].message.content == _chat_text(model45, messages, max_new_tokens=12)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    s_content, s_reasoning, _, _ = _stream_text(stream)
    assert s_reasoning == on.choices[0].message.reasoning_content
    assert s_content == (on.choices[0].message.content or "")


def test_thinking_refused_on_2_6(server26):
    with pytest.raises(openai.BadRequestError, match="thinking"):
        server26.client().chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}})


def test_stop_strings_cut_the_answer(server26):
    client = server26.client()
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[8:11]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed, _, finishes, _ = _stream_text(client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].message.content and finishes == ["stop"]
    server26.wait_idle()


def test_seed_n_and_sampling_defaults(server45):
    client = server45.client()
    messages = [{"role": "user", "content": "Pick a word."}]
    kw = dict(model=NAME, messages=messages, max_tokens=8, temperature=1.0, seed=1234, n=3)
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1 and [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.completion_tokens == 24
    single = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=1.0, seed=1235)
    assert single.choices[0].message.content == texts[1]  # choice i is seeded with seed + i
    state = server45.state
    assert (state.defaults.temperature, state.defaults.top_k, state.defaults.top_p) == (0.6, 20, 0.95)


def test_max_completion_tokens_and_length(server26):
    resp = server26.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Count."}], max_completion_tokens=5, temperature=0)
    assert resp.usage.completion_tokens <= 5
    assert resp.choices[0].finish_reason == ("length" if resp.usage.completion_tokens == 5 else "stop")


def test_raw_sse_format_ends_with_done(server26):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server26.url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
