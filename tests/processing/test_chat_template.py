"""Chat template rendering (transformers semantics) and chat()'s message flattening."""

from __future__ import annotations

import copy
import io
import json

import pytest
from PIL import Image

from minicpmv.errors import InputError, TemplateError
from minicpmv.processing.chat_template import IMAGE_TAG, ChatTemplate, flatten_messages
from minicpmv.versions import QWEN2_CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE


def _img(w: int = 20, h: int = 10, color: str = "red", mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), color)


# ---------------------------------------------------------------------------- ChatTemplate


def test_trim_and_lstrip_blocks() -> None:
    src = ("{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n"
           "{% endfor %}")
    out = ChatTemplate(src).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert out == "[a]\n[b]\n"


def test_generation_prompt_flag_and_kwargs() -> None:
    tpl = ChatTemplate(
        "{{ bos_token or '' }}{% if add_generation_prompt %}GO{% endif %}{{ x | default('') }}"
    )
    assert tpl.render([], add_generation_prompt=True) == "GO"
    assert tpl.render([], add_generation_prompt=False, x=1, bos_token="<s>") == "<s>1"


def test_raise_exception_is_template_error() -> None:
    tpl = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="first must be user"):
        tpl.render([{"role": "assistant", "content": "x"}])


def test_tojson_keeps_non_ascii() -> None:
    tpl = ChatTemplate("{{ messages[0] | tojson }}")
    out = tpl.render([{"role": "user", "content": "Grüße 你好"}])
    assert out == json.dumps({"role": "user", "content": "Grüße 你好"}, ensure_ascii=False)


def test_loop_controls_and_sandbox() -> None:
    tpl = ChatTemplate("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                       "{% endfor %}")
    assert tpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"
    with pytest.raises(TemplateError):  # immutable sandbox: no mutation of inputs
        ChatTemplate("{{ messages.append(1) }}").render([])


def test_syntax_error_is_template_error() -> None:
    with pytest.raises(TemplateError, match="syntax"):
        ChatTemplate("{% if %}")
    with pytest.raises(TemplateError):
        ChatTemplate("")


def test_builtin_fallback_templates() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatTemplate(QWEN2_CHAT_TEMPLATE).render(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    qwen3 = ChatTemplate(QWEN3_CHAT_TEMPLATE)
    no_think = qwen3.render(msgs, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3.render(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert qwen3.render(msgs).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------- flatten_messages


def test_content_join_examples_from_spec() -> None:
    a, b = _img(), _img(color="blue")
    cases = [
        ([a, "q"], f"{IMAGE_TAG}\nq"),
        ([a, b, "q"], f"{IMAGE_TAG}\n{IMAGE_TAG}\nq"),
        (["q", a], f"q\n{IMAGE_TAG}"),
        ("plain", "plain"),
    ]
    for content, expected in cases:
        msgs, images = flatten_messages([{"role": "user", "content": content}])
        assert msgs == [{"role": "user", "content": expected}]
        assert len(images) == expected.count(IMAGE_TAG)


def test_images_in_order_across_turns_and_rgb() -> None:
    a, b, c = _img(color="red"), _img(mode="L", color=200), _img(mode="RGBA", color="blue")
    msgs = [
        {"role": "user", "content": [a, "one"]},
        {"role": "assistant", "content": "ans"},
        {"role": "user", "content": ["two", b, c]},
    ]
    out, images = flatten_messages(msgs)
    assert [m["content"] for m in out] == [f"{IMAGE_TAG}\none", "ans", f"two\n{IMAGE_TAG}\n{IMAGE_TAG}"]
    assert [im.mode for im in images] == ["RGB"] * 3
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    assert images[1].getpixel((0, 0)) == (200, 200, 200)
    assert images[2].getpixel((0, 0)) == (0, 0, 255)


def test_input_not_modified() -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["x", "y"]}]
    before = copy.deepcopy(msgs)
    flatten_messages(msgs, image=_img(), system_prompt="sys")
    assert msgs == before


def test_image_argument_goes_first() -> None:
    out, images = flatten_messages([{"role": "user", "content": "what?"}], image=_img())
    assert out[0]["content"] == f"{IMAGE_TAG}\nwhat?" and len(images) == 1


def test_image_argument_with_list_content_is_refused() -> None:
    with pytest.raises(InputError, match="image="):
        flatten_messages([{"role": "user", "content": ["what?"]}], image=_img())


def test_system_prompt_prepended() -> None:
    out, _ = flatten_messages([{"role": "user", "content": "hi"}], system_prompt="Be brief.")
    assert out == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out, _ = flatten_messages([{"role": "user", "content": "hi"}], system_prompt="")
    assert out == [{"role": "user", "content": "hi"}]


def test_json_string_messages() -> None:
    text = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    out, images = flatten_messages(text)
    assert out[1] == {"role": "assistant", "content": "yo"} and images == []
    with pytest.raises(InputError, match="JSON"):
        flatten_messages("[{not json")


def test_typed_dict_items(tmp_path) -> None:
    path = tmp_path / "a.png"
    _img(color="green").save(path)
    buf = io.BytesIO()
    _img(color="blue").save(buf, format="PNG")
    content = [
        {"type": "text", "text": "look"},
        {"type": "image", "image": str(path)},
        {"type": "image", "image": buf.getvalue()},
        {"type": "image", "image": _img()},
    ]
    out, images = flatten_messages([{"role": "user", "content": content}])
    assert out[0]["content"] == "look\n" + "\n".join([IMAGE_TAG] * 3)
    assert [im.getpixel((0, 0)) for im in images] == [(0, 128, 0), (0, 0, 255), (255, 0, 0)]


@pytest.mark.parametrize(
    "item",
    [123, None, b"raw", {"type": "audio", "audio": "x"}, {"type": "image"}, {"type": "text"},
     {"type": "image_url", "image_url": "http://x"}],
)
def test_unknown_content_items_are_refused(item: object) -> None:
    with pytest.raises(InputError):
        flatten_messages([{"role": "user", "content": ["q", item]}])


@pytest.mark.parametrize(
    "msgs, match",
    [
        ([{"role": "assistant", "content": "hi"}], "first message"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "role 'system'"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "role 'tool'"),
        ([{"content": "hi"}], "'role'"),
        (["hi"], "'role'"),
        ([], "non-empty"),
        ({"role": "user", "content": "hi"}, "non-empty list"),
        ([{"role": "user", "content": 5}], "content must be"),
    ],
)
def test_bad_messages(msgs: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        flatten_messages(msgs)
