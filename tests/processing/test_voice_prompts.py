"""Voice set-up messages: the official strings per mode and language, errors, and the messages
going through the o2.6 processor (a reference clip in the first message)."""

from __future__ import annotations

import numpy as np
import pytest

from minicpmv.errors import InputError
from minicpmv.processing.voice_prompts import DEFAULT_VOICE, READ_ALOUD, get_sys_prompt, voice_cloning_messages

REF = np.zeros(16000, dtype=np.float32)


def test_modes_and_languages():
    assert get_sys_prompt() == {"role": "user", "content": [
        "You are a helpful assistant. You can accept audio and text input and output voice and text."]}
    m = get_sys_prompt(REF, "voice_cloning", "en")
    assert m["role"] == "user" and m["content"][0] == "Clone the voice in the provided audio prompt."
    assert m["content"][1] is REF and len(m["content"]) == 2
    assert get_sys_prompt(REF, "voice_cloning", "zh")["content"][0] == "模仿输入音频中的声音特征。"
    assert get_sys_prompt(None, "audio_assistant", "en")["content"] == [
        DEFAULT_VOICE, "As an assistant, you will speak using this voice style."]
    assert get_sys_prompt(REF, "audio_roleplay", "en")["content"][2] == \
        "Try to role-play the character based on the audio prompt above."
    assert get_sys_prompt(REF, "audio_roleplay", "zh")["content"][2] == "假装你是上述音频中的人物，与我进行对话。"
    omni = get_sys_prompt(REF, "omni", "en")["content"]
    assert omni[0].endswith("output voice and text. Clone the voice in the provided audio prompt.")
    assert get_sys_prompt(None, "omni", "fr")["content"][0].startswith("You are a helpful assistant.")


def test_bad_calls_are_refused():
    with pytest.raises(InputError, match="voice_cloning needs ref_audio"):
        get_sys_prompt(None, "voice_cloning")
    with pytest.raises(InputError, match="unknown voice prompt mode"):
        get_sys_prompt(REF, "karaoke")
    with pytest.raises(InputError, match="numpy waveform"):
        get_sys_prompt([0.0, 0.1], "audio_assistant")
    with pytest.raises(InputError, match="text to read"):
        voice_cloning_messages(REF, "")


def test_cloning_messages_build_a_speech_prompt(tts_model):
    msgs = voice_cloning_messages(np.full(16000, 0.01, dtype=np.float32), "Good morning.")
    assert msgs[1] == {"role": "user", "content": [READ_ALOUD, "Good morning."]}
    inputs = tts_model.processor([msgs])
    prompt = inputs.prompts[0]
    assert prompt.startswith("<|im_start|>user\nClone the voice in the provided audio prompt.\n(<audio>./</audio>)")
    assert prompt.endswith("<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>")  # audio -> TTS template
    assert len(inputs.audio_bounds[0]) == 1


def test_with_voice_puts_the_voice_message_first_after_a_system_message():
    from minicpmv.processing.voice_prompts import with_voice

    msgs = [{"role": "user", "content": "Hi"}]
    out = with_voice(msgs, REF)
    assert out[1] is msgs[0] and out[0] == get_sys_prompt(REF, "audio_assistant", "en") and len(msgs) == 1
    system = [{"role": "system", "content": "Be brief."}, *msgs]
    out = with_voice(system, None, mode="audio_roleplay", language="zh")
    assert out[0] is system[0] and out[1]["content"][0] == DEFAULT_VOICE and out[2] is msgs[0]
    with pytest.raises(InputError, match="conversation"):
        with_voice("Hi")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="mode"):
        with_voice(msgs, REF, mode="whisper")
