"""Bounded load test on loopback: 32 concurrent clients x 8 requests, mixed streaming and
non-streaming, text and images, greedy and seeded sampling. Every request must succeed and get
exactly the answer the same request gets when it is alone on the server (batch invariance)."""

from __future__ import annotations

import concurrent.futures as cf

from .conftest import NAME, image_part, random_image

CLIENTS, PER_CLIENT = 32, 8


def _pool() -> list[dict]:
    img_a, img_b = image_part(random_image(11, (96, 64))), image_part(random_image(12, (48, 80)))
    pool = [
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6},
        {"messages": [{"role": "user", "content": "Tell me about " + "the sea " * 20}], "max_tokens": 12},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is two plus two?"}], "max_tokens": 9},
        {"messages": [{"role": "user", "content": [img_a, {"type": "text", "text": "What is this?"}]}],
         "max_tokens": 8},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare"}, img_a, img_b]}],
         "max_tokens": 10},
        {"messages": [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
                      {"role": "user", "content": "Three?"}], "max_tokens": 14},
        {"messages": [{"role": "user", "content": "Sample something"}], "max_tokens": 8, "temperature": 0.8,
         "seed": 99},
        {"messages": [{"role": "user", "content": "Think"}], "max_tokens": 7,
         "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
    ]
    for p in pool:
        p.setdefault("temperature", 0)
    return pool


def _ask(client, spec: dict, stream: bool) -> tuple[str, str, str | None]:
    kw = {k: v for k, v in spec.items() if k != "extra_body"}
    extra = spec.get("extra_body")
    if not stream:
        r = client.chat.completions.create(model=NAME, extra_body=extra, **kw)
        msg = r.choices[0].message
        return msg.content or "", getattr(msg, "reasoning_content", None) or "", r.choices[0].finish_reason
    content, reasoning, finish = [], [], None
    for chunk in client.chat.completions.create(model=NAME, extra_body=extra, stream=True, **kw):
        for c in chunk.choices:
            content.append(c.delta.content or "")
            reasoning.append(getattr(c.delta, "reasoning_content", None) or "")
            finish = c.finish_reason or finish
    return "".join(content), "".join(reasoning), finish


def test_32_clients_get_the_answers_they_get_alone(server45):
    pool = _pool()
    client = server45.client()
    alone = [_ask(client, spec, stream=False) for spec in pool]
    steps_before = server45.state.engine.stats.steps

    def worker(c: int) -> list[tuple[int, tuple[str, str, str | None]]]:
        own = server45.client()
        out = []
        for j in range(PER_CLIENT):
            k = (c * PER_CLIENT + j) % len(pool)
            out.append((k, _ask(own, pool[k], stream=(c + j) % 2 == 1)))
        return out

    with cf.ThreadPoolExecutor(CLIENTS) as ex:
        results = [r for rs in ex.map(worker, range(CLIENTS)) for r in rs]
    assert len(results) == CLIENTS * PER_CLIENT
    mismatches = [(k, got, alone[k]) for k, got in results if got != alone[k]]
    assert not mismatches, mismatches[:3]
    stats = server45.state.engine.stats
    assert stats.busy_rows_sum - 0 > 2 * (stats.steps - steps_before)  # requests really shared steps
    server45.wait_idle()
