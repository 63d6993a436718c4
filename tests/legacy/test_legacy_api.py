"""One API for every release: load / chat / stream / ChatSession / CLI on 2.0, 2.5 and o2.6."""

from __future__ import annotations

import wave

import pytest
import torch
from PIL import Image

from minicpmv import ChatSession
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import InputError

from .conftest import CONF, LEGACY, case_audio, case_image

GREEDY = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6)


def _image(color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (120, 90), color)


@pytest.mark.parametrize("version", LEGACY)
def test_chat_stream_and_session_agree(version, legacy_models):
    cm = legacy_models(version)
    first = [{"role": "user", "content": [_image(), "What is this?"]}]
    answer = cm.chat(first, **GREEDY)
    assert isinstance(answer, str)
    streamed = "".join(cm.chat(first, stream=True, **{**GREEDY, "sampling": True, "top_k": 1}))
    with torch.inference_mode():  # both against the greedy ids, exactly (spec §9.4 / §9.5)
        params = SamplingParams.from_official(cm.version, sampling=False, max_new_tokens=6,
                                              overrides={"num_beams": 1, "repetition_penalty": 1.0})
        ids = cm.runner.generate_ids(cm.prepare([first]), params)[0]
    assert answer == cm.runner.postprocess(ids)
    shown = cm.tokenizer.decode([i for i in ids if i not in cm.terminator_ids()])
    for text in (*cm.version.strip_from_answer, *(cm.tokenizer.id_to_token(t) for t in cm.terminator_ids())):
        shown = shown.replace(text, "")
    assert streamed and streamed == shown
    session = ChatSession(cm, **GREEDY)
    assert session.ask([_image(), "What is this?"]) == answer
    second = session.ask("And its color?")
    history = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And its color?"}]
    assert second == cm.chat(history, **GREEDY)
    assert session.last_prefill_tokens < len(cm.processor([history]).input_ids[0])  # the KV prefix was reused


@pytest.mark.parametrize("version", LEGACY)
def test_sampling_and_beam_presets_run(version, legacy_models):
    cm = legacy_models(version)
    msgs = [{"role": "user", "content": "Hello"}]
    assert cm.chat(msgs, max_new_tokens=4, seed=0) == cm.chat(msgs, max_new_tokens=4, seed=0)
    assert isinstance(cm.chat(msgs, sampling=False, max_new_tokens=4), str)  # official beam preset


def test_v20_single_image_and_no_system_prompt(legacy_models):
    cm = legacy_models("2.0")
    image = case_image("2.0", "img_224x160")
    q = [{"role": "user", "content": "What is in the image?"}]
    in_content = [{"role": "user", "content": [image, q[0]["content"]]}]
    assert cm.chat(q, image=image, **GREEDY) == cm.chat(in_content, **GREEDY)
    with pytest.raises(InputError, match="at most 1"):
        cm.chat([{"role": "user", "content": [image, _image(), "compare"]}], **GREEDY)
    with pytest.raises(InputError, match="no system prompt"):
        cm.chat(q, system_prompt="Be brief.", **GREEDY)
    session = ChatSession(cm, **GREEDY)
    session.ask([image, "What is it?"])
    with pytest.raises(InputError, match="at most 1"):
        session.ask([_image(), "and this one?"])


def test_v25_text_only_and_system_prompt(legacy_models):
    cm = legacy_models("2.5")
    msgs = [{"role": "user", "content": "Hello, how are you today?"}]
    assert isinstance(cm.chat(msgs, **GREEDY), str)  # the official chat() raises here
    inputs = cm.processor([msgs], system_prompt="Be brief.")
    assert inputs.prompts[0].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
    assert inputs.input_ids[0][:2] == [cm.tokenizer.bos_token_id] * 2  # template BOS + tokenizer BOS


def test_o26_system_message_audio_and_tts_template(legacy_models):
    cm = legacy_models("o2.6")
    system = {"role": "system", "content": "Be brief."}
    msgs = [system, {"role": "user", "content": [case_audio(), "What do you hear?"]}]
    answer = cm.chat(msgs, **GREEDY)
    assert isinstance(answer, str)
    with pytest.raises(InputError, match="not both"):
        cm.chat(msgs, system_prompt="Other.", **GREEDY)
    inputs = cm.processor([[{"role": "user", "content": "hi"}]], use_tts_template=True)
    assert inputs.prompts[0].endswith("<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>")
    assert "You are a helpful assistant" not in inputs.prompts[0]
    session = ChatSession(cm, **GREEDY)
    assert session.ask([case_audio(), "What do you hear?"]) == cm.chat(msgs[1:], **GREEDY)
    assert isinstance(session.ask("Anything else?"), str)


def test_o26_audio_and_images_in_one_batch(legacy_models):
    cm = legacy_models("o2.6")
    convs = [[{"role": "user", "content": [case_audio(), _image(), "describe both"]}],
             [{"role": "user", "content": "just text"}]]
    out = cm.chat(convs, **GREEDY)
    assert len(out) == 2 and out[1] == cm.chat(convs[1], **GREEDY)


def _wav(path, rate=16000) -> str:
    pcm = (case_audio() * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return str(path)


def test_cli_chat_with_audio_and_inspect(tmp_path, capsys):
    from minicpmv.cli import main

    model = str(CONF / "o2.6" / "_checkpoint")
    assert main(["chat", "-m", model, "--dtype", "float32", "--audio", _wav(tmp_path / "clip.wav"),
                 "--greedy", "--max-new-tokens", "3", "What do you hear?"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["chat", "-m", model, "--audio", _wav(tmp_path / "slow.wav", rate=8000), "hi"]) == 2
    assert "8000 Hz" in capsys.readouterr().err
    for version, title in [("2.0", "MiniCPM-V 2.0"), ("2.5", "MiniCPM-Llama3-V 2.5"), ("o2.6", "MiniCPM-o 2.6")]:
        assert main(["inspect", str(CONF / version / "_checkpoint")]) == 0
        assert f"version      {title}" in capsys.readouterr().out


@pytest.mark.parametrize("version", ["2.0", "2.5"])
def test_cli_chat_with_image(version, tmp_path, capsys):
    from minicpmv.cli import main

    path = tmp_path / "img.png"
    _image().save(path)
    argv = ["chat", "-m", str(CONF / version / "_checkpoint"), "--dtype", "float32", "--image", str(path),
            "--greedy", "--max-new-tokens", "3", "What is this?"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() != ""
