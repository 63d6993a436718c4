"""Unit tests of the server's pure parts: reasoning split, incremental text with stop strings,
data: URLs, media-dir confinement, address checks, request conversion, defaults, CLI flags."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from minicpmv.cli import build_parser
from minicpmv.serve.config import GenerationDefaults, ServerConfig, config_from_args
from minicpmv.serve.convert import plan_request, resolved_conversation, sampling_params
from minicpmv.serve.errors import APIError
from minicpmv.serve.media import MediaPolicy, checked_address, decode_data_url, fetch_media, resolve_local
from minicpmv.serve.schemas import ChatCompletionRequest


# ---------------------------------------------------------------------------- media
def test_data_urls():
    payload = base64.b64encode(b"\x89PNG-bytes").decode()
    assert decode_data_url(f"data:image/png;base64,{payload}", 100) == b"\x89PNG-bytes"
    cases = [("data:image/png;base64,@@@", "invalid_base64"), ("data:image/png,rawtext", "invalid_data_url"),
             ("data:image/png;base64", "invalid_data_url"), (f"data:image/png;base64,{payload}", "media_too_large")]
    for url, code in cases:
        with pytest.raises(APIError) as e:
            decode_data_url(url, 100 if code != "media_too_large" else 4)
        assert e.value.status == 400 and e.value.code == code


def test_local_files_confined(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"y")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    assert resolve_local(f"file://{root / 'a.png'}", root) == (root / "a.png").resolve()
    assert resolve_local("a.png", root) == (root / "a.png").resolve()
    for bad in ("../outside.png", f"file://{tmp_path / 'outside.png'}", "link.png", "/etc/passwd"):
        with pytest.raises(APIError) as e:
            resolve_local(bad, root)
        assert e.value.status == 403 and e.value.code == "media_path_forbidden"
    with pytest.raises(APIError) as e:
        resolve_local("a.png", None)
    assert e.value.status == 400 and e.value.code == "local_media_disabled"
    assert asyncio.run(fetch_media("a.png", MediaPolicy(media_dir=root))) == b"x"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.10", "169.254.169.254",
                                  "::1", "0.0.0.0", "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1",
                                  "2002:7f00:1::"])
def test_non_public_hosts_refused(host):
    with pytest.raises(APIError) as e:
        asyncio.run(checked_address(host, 80, MediaPolicy()))
    assert e.value.code == "media_address_forbidden"


def test_public_ip_literal_allowed_and_schemes():
    assert str(asyncio.run(checked_address("8.8.8.8", 443, MediaPolicy()))) == "8.8.8.8"
    with pytest.raises(APIError, match="remote media URLs are disabled"):
        asyncio.run(fetch_media("https://example.com/a.png", MediaPolicy()))
    with pytest.raises(APIError, match="unsupported media URL scheme"):
        asyncio.run(fetch_media("ftp://example.com/a.png", MediaPolicy()))


# ---------------------------------------------------------------------------- conversion
def _req(**kw) -> ChatCompletionRequest:
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest(**kw)


def _plan(req: ChatCompletionRequest, defaults: GenerationDefaults | None = None, thinking: bool = True):
    return plan_request(req, defaults or GenerationDefaults(), supports_thinking=thinking, vocab_size=100,
                        max_images=2)


def test_messages_become_the_official_format():
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    plan = _plan(_req(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Really."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look"}, img]},
        {"role": "assistant", "content": None}, {"role": "user", "content": "And?"}]))
    assert plan.system_prompt == "Be brief.\n\nReally."
    assert [m["role"] for m in plan.conversation] == ["user", "assistant", "user"]
    assert [r.kind for r in plan.media] == ["image"]
    plan.media[0].value = "IMAGE"
    assert resolved_conversation(plan)[0]["content"] == ["Look", "IMAGE"]


@pytest.mark.parametrize("kw, match", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system messages"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "start with a user"),
    ({"messages": [{"role": "system", "content": "only"}]}, "no user message"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "true or false"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"100": 1}}, "logit_bias"),
    ({"stop": ["a", ""]}, "stop"),
])
def test_refused_requests(kw, match):
    with pytest.raises(APIError, match=match) as e:
        _plan(_req(**kw))
    assert e.value.status == 400


def test_too_many_images_and_thinking_unsupported():
    img = {"type": "image_url", "image_url": {"url": "data:,"}}
    with pytest.raises(APIError, match="3 images"):
        _plan(_req(messages=[{"role": "user", "content": [img, img, img]}]))
    with pytest.raises(APIError, match="thinking"):
        _plan(_req(chat_template_kwargs={"enable_thinking": True}), thinking=False)
    assert _plan(_req(), GenerationDefaults(enable_thinking=True), thinking=False).enable_thinking is False


def test_sampling_defaults_and_overrides():
    defaults = GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.1)
    plan = _plan(_req(), defaults)
    opts = sampling_params(plan, prompt_tokens=10, max_model_len=100)
    assert (opts.temperature, opts.top_p, opts.top_k, opts.repetition_penalty) == (0.6, 0.95, 20, 1.1)
    assert opts.max_new_tokens == 90  # no max_tokens: the rest of the context
    plan = _plan(_req(temperature=0, top_k=-1, max_tokens=5, max_completion_tokens=7, seed=-1,
                      logit_bias={"3": -100}), defaults)
    opts = sampling_params(plan, prompt_tokens=10, max_model_len=100)
    assert opts.greedy and opts.top_k == 0 and opts.max_new_tokens == 7 and opts.seed == 2**63 - 1
    assert opts.logit_bias == ((3, -100.0),)


def test_tiny_temperatures_are_greedy_and_tiny_penalties_refused():
    """Found by the request fuzzer: temperature 5e-324 divided the logits into inf (500). Like
    vLLM, a temperature under 1e-5 means greedy; a repetition penalty under 1e-3 is refused."""
    assert sampling_params(_plan(_req(temperature=5e-324)), prompt_tokens=10, max_model_len=100).greedy
    tiny = sampling_params(_plan(_req(temperature=1e-5)), 10, 100)
    assert not tiny.greedy and tiny.temperature == 1e-5
    with pytest.raises(ValueError, match="repetition_penalty"):
        _req(repetition_penalty=1e-300)


def test_generation_defaults_from_dict():
    assert GenerationDefaults.from_dict({}) == GenerationDefaults()
    assert GenerationDefaults.from_dict({"do_sample": False, "temperature": 0.7}).temperature == 0.0
    d = GenerationDefaults.from_dict({"temperature": 0.6, "top_k": 20,
                                      "chat_template_kwargs": {"enable_thinking": True}})
    assert (d.temperature, d.top_k, d.enable_thinking) == (0.6, 20, True)


def test_cli_flags_map_onto_the_config():
    args = build_parser().parse_args(["serve", "--model", "ckpt/MiniCPM-V-4_5", "--port", "0",
                                      "--allow-remote-media", "--media-dir", "/srv/media", "--max-batch-size", "3",
                                      "--no-batch-invariance", "--max-model-len", "2048"])
    cfg = config_from_args(args)
    assert cfg.allow_remote_media and cfg.media_dir == "/srv/media" and cfg.max_batch_size == 3
    assert not cfg.batch_invariant and cfg.max_model_len == 2048 and cfg.model_name() == "MiniCPM-V-4_5"
    assert ServerConfig(model="x", served_model_name="named").model_name() == "named"
    assert not ServerConfig().allow_remote_media and ServerConfig().media_dir is None


def test_compile_flag():
    parse = build_parser().parse_args
    assert config_from_args(parse(["serve", "--model", "m"])).compile is None
    assert config_from_args(parse(["serve", "--model", "m", "--compile"])).compile == "auto"
    assert config_from_args(parse(["serve", "--model", "m", "--compile", "static"])).compile == "static"
    assert parse(["chat", "--compile", "max-autotune", "hi"]).compile == "max-autotune"


def test_speech_flags_map_onto_the_config(tmp_path):
    from minicpmv.errors import InputError

    ref = tmp_path / "ref.wav"
    ref.write_bytes(b"RIFF")
    args = build_parser().parse_args(["serve", "--model", "m", "--voice", f"narrator={ref}", "--voice-language", "zh",
                                      "--max-audio-seconds", "30", "--max-input-audio-seconds", "10",
                                      "--max-speech-input-chars", "500"])
    cfg = config_from_args(args)
    assert cfg.voices == (("narrator", str(ref.resolve())),) and cfg.voice_language == "zh"
    assert (cfg.max_audio_seconds, cfg.max_input_audio_seconds, cfg.max_speech_input_chars) == (30, 10, 500)
    for flags, match in [(["--voice", "narrator"], "NAME=REF_AUDIO"), (["--voice", f"default={ref}"], "built-in"),
                         (["--voice", f"a={ref}", "--voice", f"a={ref}"], "twice"),
                         (["--voice", f"a={tmp_path / 'missing.wav'}"], "does not exist"),
                         (["--max-audio-seconds", "0"], "must be positive")]:
        with pytest.raises(InputError, match=match):
            config_from_args(build_parser().parse_args(["serve", "--model", "m", *flags]))


def test_spoken_requests_are_planned():
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    plan = _plan(_req(messages=[{"role": "user", "content": [audio, {"type": "text", "text": "Hi"}]}],
                      modalities=["text", "audio"], audio={"voice": {"id": "narrator"}, "format": "pcm16"}))
    assert plan.speak and plan.voice == "narrator" and plan.audio_format == "pcm16" and not plan.own_voice_prompt
    assert [r.kind for r in plan.media] == ["audio"] and plan.media[0].url == "data:audio/wav;base64,AAAA"
    plan = _plan(_req(messages=[{"role": "system", "content": [{"type": "text", "text": "Clone it."}, audio]},
                                {"role": "developer", "content": "Briefly."}, {"role": "user", "content": "Hi"}],
                      modalities=["audio", "text"], audio={"voice": "default", "format": "wav"}))
    assert plan.own_voice_prompt and plan.system_prompt == ""
    assert [m["role"] for m in plan.conversation] == ["system", "user"]
    assert plan.conversation[0]["content"][0] == "Clone it." and plan.conversation[0]["content"][2] == "Briefly."
    assert not _plan(_req(audio={"voice": "default", "format": "wav"})).speak  # audio without the modality
