"""Every o2.6-tts conformance case passes every stage, through the production speech functions.

The tiny MiniCPM-o with its speech head is assembled from the vectors' archive (``tts_checkpoint``
fixture); the runner is the one ``minicpmv conformance`` uses. A tampered expectation must fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minicpmv.conformance import TTSCaseRunner, assemble_tts_checkpoint, expand_case_dirs
from minicpmv.errors import CheckpointError

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
TTS = CONF / "o2.6-tts"
CASES = expand_case_dirs([TTS])
# stages that must be present per case (beyond "all pass"): the README's key outputs
KEY_STAGES = {
    "text_frontend": {"s9/tts_text_sha", "s2/normalized", "special_ids"},
    "core_chat_path": {"spk_emb", "cond_inputs_embeds", "first_step_logits", "codes", "mask_visible",
                       "prefill_calls", "generate_calls", "vq_feats", "mel", "wav"},
    "decode": {"random/wav", "from_core/vocos_backbone", "crossfade_ab/out0", "crossfade_cb/out1"},
    "streaming_path": {"codes", "chunk_lens", "chunk_texts", "chunk_4_wav", "text_calls", "prefill_calls"},
    "streaming_path_outspeednew_variant": {"codes", "chunk_lens", "chunk_5_wav"},
    "sampler_flat": {"step_probs", "nonzero_count", "raw_logits_first3"},
    "e2e_chat": {"llm_generated_ids", "answer_text", "spk_hidden", "tts_input_ids", "codes", "wav"},
}


def test_all_cases_present():
    assert sorted(c.name for c in CASES) == sorted(KEY_STAGES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case, tts_model):
    results = list(TTSCaseRunner(tts_model, case).run())
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    assert KEY_STAGES[case.name] <= {r.stage for r in results}


def _tampered(tmp_path, case: str, key: str, change) -> object:
    dst = tmp_path / "o2.6-tts" / case
    shutil.copytree(TTS / case, dst)
    with np.load(dst / "tensors.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays[key] = change(arrays[key].copy())
    np.savez(dst / "tensors.npz", **arrays)
    return dst


def test_a_changed_code_or_sample_fails(tmp_path, tts_model):
    def bump_code(a):
        a[7, 2] = (a[7, 2] + 1) % 625
        return a

    def bump_sample(a):
        a[1000] += 2e-5
        return a

    case = _tampered(tmp_path, "core_chat_path", "codes", bump_code)
    bad = {r.stage for r in TTSCaseRunner(tts_model, case).run() if not r.ok}
    assert bad == {"codes"}
    case = _tampered(tmp_path / "b", "decode", "random_wav", bump_sample)
    bad = {r.stage for r in TTSCaseRunner(tts_model, case).run() if not r.ok}
    assert bad == {"random/wav"}


def test_cli_runs_the_tts_cases_and_fails_on_a_tampered_one(tmp_path, capsys):
    from minicpmv.cli import main

    assert main(["conformance", str(TTS / "text_frontend")]) == 0
    assert "0 failed" in capsys.readouterr().out
    dst = tmp_path / "o2.6-tts" / "text_frontend"
    shutil.copytree(TTS / "text_frontend", dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["strings"][1]["streaming_normalized"] = "I have twenty-three books and four cats."
    (dst / "meta.json").write_text(json.dumps(meta))
    assert main(["conformance", str(dst), "--checkpoint", str(TTS / "_checkpoint")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "s1/normalized" in out


def test_assembly_refuses_another_llm_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not the LLM checkpoint"):
        assemble_tts_checkpoint(TTS / "_checkpoint", tmp_path / "out", llm_dir=CONF / "2.6" / "_checkpoint")


def test_assembled_directory_is_the_official_layout(tts_checkpoint):
    index = json.loads((tts_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert sum(k.startswith("tts.") for k in index) == 277 and "llm.lm_head.weight" in index
    assert (tts_checkpoint / "assets" / "Vocos.pt").is_file()
    assert (tts_checkpoint / "assets" / "chattts_tokenizer" / "tokenizer.json").is_file()
    assert json.loads((tts_checkpoint / "config.json").read_text())["init_tts"] is True
