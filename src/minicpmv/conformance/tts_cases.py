"""Conformance cases of MiniCPM-o 2.6 speech output (the ``o2.6-tts`` vectors).

Layout (README of the vectors): ``<case>/meta.json`` + ``<case>/tensors.npz`` per case and a
``_checkpoint/`` archive that is not runnable as stored: ``config.json``, ``tts.safetensors.xz``
(every ``tts.*`` tensor), ``assets/Vocos.pt.xz``, ``assets/chattts_tokenizer/`` and ``keys.json``
(sha256 of the uncompressed files and of the companion LLM checkpoint ``../o2.6/_checkpoint``).
``assemble_tts_checkpoint`` builds the official model directory from the archive + that LLM
checkpoint (sharded safetensors with an index; assets decompressed), checking every hash.

``TTSCaseRunner`` runs one case through the production paths (``chat(generate_audio=True)``
for ``e2e_chat``, a ``LiveSession`` for the streaming cases, the speech functions of
``engine/speech.py`` and ``processing/tts_text.py`` for the stage-level cases) and yields a
``StageResult`` per stage with the README's tolerances: strings, ids, masks, codes and
schedules exact; embeddings / hidden states 1e-5; raw logits 1e-5 x max|logits| with the
arg-max exact; vq features 1e-6; decoder output, mel and Vocos backbone 1e-4 (+ rtol 1e-4);
waveforms 1e-5; cross-fade 1e-6; teacher-forced sampler probabilities 2e-6. Used by
``conformance.run_cases``; nothing in the library imports it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import lzma
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..engine.chat import ChatModel
from ..engine.live import LiveSession
from ..engine.sampling import SamplingParams
from ..engine.speech import (
    SpeechSynthesizer,
    crossfade,
    get_synthesizer,
    official_answer_text,
    speaker_hidden,
)
from ..engine.speech_codes import SpeechTrace
from ..errors import CheckpointError, MiniCPMVError
from ..loading.checkpoint import file_sha256
from ..processing.tts_text import (
    detect_language,
    normalize_stream_piece,
    prepare_tts_text,
    sentence_end,
    speech_text,
    text_mask,
)
from .common import StageResult, allclose, close, exact

TOL_EMBED = 1e-5
TOL_LOGITS_REL = 1e-5
TOL_VQ = 1e-6
TOL_DECODE = 1e-4  # atol and rtol
TOL_WAV = 1e-5
TOL_XFADE = 1e-6
TOL_PROBS = 2e-6  # 1.1e-6 measured on a Sapphire Rapids (AMX) host, 2 threads; 9.5e-7 elsewhere
FLAT_HEAD_SCALE = 1 / 60000  # sampler_flat: every head magnitude g scaled by this (fp32)
ARCHIVE_MARK = "tts.safetensors.xz"


def is_tts_case(case_dir: Path) -> bool:
    return (case_dir / "meta.json").is_file() and (case_dir / "tensors.npz").is_file()


def is_tts_archive(checkpoint: Path) -> bool:
    return (checkpoint / ARCHIVE_MARK).is_file()


# ---------------------------------------------------------------------------------- assembly


def _unxz(src: Path, dst: Path, want_sha: str | None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    if want_sha is not None and file_sha256(dst) != want_sha:
        raise CheckpointError(f"{src} decompresses to data whose sha256 differs from keys.json")


def assemble_tts_checkpoint(archive: Path, out: Path, llm_dir: Path | None = None) -> Path:
    """Build a runnable MiniCPM-o directory at ``out`` from the vectors' archive (README steps
    1-4): the LLM checkpoint's files, the archive's config.json, the weights as two shards with
    a ``model.safetensors.index.json``, and the decompressed ``assets/``. Returns ``out``."""
    archive, out = Path(archive), Path(out)
    keys = json.loads((archive / "keys.json").read_text())
    sums = keys.get("sha256_uncompressed", {})
    [(rel, llm_sha)] = keys["sha256_llm_checkpoint_used"].items()
    llm_model = (llm_dir / "model.safetensors") if llm_dir is not None else (archive.parent / rel)
    if not llm_model.is_file():
        raise CheckpointError(f"{archive} needs the companion LLM checkpoint {llm_model}")
    if file_sha256(llm_model) != llm_sha:
        raise CheckpointError(f"{llm_model} is not the LLM checkpoint these vectors were made with (sha256)")
    out.mkdir(parents=True, exist_ok=True)
    for f in llm_model.parent.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    shutil.copy2(archive / "config.json", out / "config.json")
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    shutil.copy2(llm_model, out / shards[0])
    _unxz(archive / ARCHIVE_MARK, out / shards[1], sums.get("tts.safetensors"))
    weight_map = {}
    for name in shards:
        with safe_open(str(out / name), framework="pt") as f:
            weight_map.update({k: name for k in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _unxz(archive / "assets" / "Vocos.pt.xz", out / "assets" / "Vocos.pt", sums.get("assets/Vocos.pt"))
    shutil.copytree(archive / "assets" / "chattts_tokenizer", out / "assets" / "chattts_tokenizer",
                    dirs_exist_ok=True)
    return out


# ---------------------------------------------------------------------------------- runner


def _logits(case: str, stage: str, got: np.ndarray, want: np.ndarray) -> StageResult:
    tol = TOL_LOGITS_REL * float(np.max(np.abs(want)))
    return close(case, stage, got, want, tol)


def _calls(calls: list[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return [tuple(c[k] for k in keys) for c in calls]


_PREFILL = ("begin", "end", "ids", "with_spk")
_GENERATE = ("input_len", "past_len_before", "max_new_token", "new_ids_total", "finished")


class TTSCaseRunner:
    """Runs every stage of one o2.6-tts case against a loaded float32 MiniCPM-o ``ChatModel``."""

    def __init__(self, chat_model: ChatModel, case_dir: Path) -> None:
        self.cm, self.dir = chat_model, case_dir
        self.name = f"{case_dir.parent.name}/{case_dir.name}"
        self.meta = json.loads((case_dir / "meta.json").read_text(encoding="utf-8"))
        with np.load(case_dir / "tensors.npz") as npz:
            self.t = {k: npz[k] for k in npz.files}

    def run(self) -> Iterator[StageResult]:
        synth = get_synthesizer(self.cm)
        kind = self.dir.name
        if kind == "text_frontend":
            yield from self._text_frontend(synth)
        elif kind == "core_chat_path":
            yield from self._core(synth)
        elif kind == "decode":
            yield from self._decode(synth)
        elif kind.startswith("streaming_path"):
            yield from self._streaming(synth, "early" if "outspeednew" in kind else "hold")
        elif kind == "sampler_flat":
            yield from self._sampler_flat(synth)
        elif kind == "e2e_chat":
            yield from self._e2e(synth)
        else:
            raise MiniCPMVError(f"{self.name}: unknown o2.6-tts case kind {kind!r}")

    def _spk(self) -> torch.Tensor:
        return torch.from_numpy(self.t["spk_hidden"])

    # ------------------------------------------------------------------ cases
    def _text_frontend(self, synth: SpeechSynthesizer) -> Iterator[StageResult]:
        tok, n = synth.tokenizer, self.name
        for s in self.meta["strings"]:
            i, text = s["index"], s["text"]
            lang = detect_language(text)
            yield exact(n, f"s{i}/language", lang, s["detect_language"])
            yield exact(n, f"s{i}/normalized", normalize_stream_piece(text, lang), s["streaming_normalized"])
            yield exact(n, f"s{i}/sentence_end", sentence_end(text), s["sentence_end"])
            yield exact(n, f"s{i}/tokens", tok.tokens(text), s["chattts_tokens"])
            yield exact(n, f"s{i}/ids", tok.encode(text), self.t[f"ids_{i}"].tolist())
            prep = prepare_tts_text(tok, text)
            yield exact(n, f"s{i}/tts_text_sha", hashlib.sha256(prep.text.encode()).hexdigest(),
                        s["prepare_tts_text_sha256"])
            yield exact(n, f"s{i}/tts_token_len", (prep.n_tokens, len(prep.ids)),
                        (s["tts_token_len"], s["tts_input_len"]))
            yield exact(n, f"s{i}/tts_input_ids", prep.ids, self.t[f"tts_input_ids_{i}"].tolist())
            yield exact(n, f"s{i}/text_mask", text_mask(prep.n_tokens), self.t[f"streaming_mask_{i}"].tolist())
        got = {k: tok.token_to_id(k) for k in self.meta["special_ids"]}
        yield exact(n, "special_ids", got, self.meta["special_ids"])

    def _core(self, synth: SpeechSynthesizer) -> Iterator[StageResult]:
        n, t, tts = self.name, self.t, synth.tts
        with torch.inference_mode():
            spk = self._spk()[None]
            yield close(n, "spk_projected", tts.projector(spk).numpy(), t["spk_projected"], TOL_EMBED)
            speaker = synth.speaker_embedding(spk)
            yield close(n, "spk_emb", speaker.numpy(), t["spk_emb"], TOL_EMBED)
            cond = synth.tts_text(self.meta["text"])
            yield exact(n, "tts_text", (cond.text, cond.n_tokens), (self.meta["tts_text"], self.meta["tts_token_len"]))
            yield exact(n, "tts_input_ids", cond.ids, t["tts_input_ids"].tolist())
            yield exact(n, "text_mask", text_mask(cond.n_tokens), t["streaming_mask"].tolist())
            rows = tts.text_embeddings(torch.tensor(cond.ids[:-1]), speaker)
            yield close(n, "cond_inputs_embeds", rows.numpy(), t["cond_inputs_embeds"], TOL_EMBED)
            bos = tts.emb_text(torch.tensor([tts.config.audio_bos_token_id]))[0]
            yield close(n, "audio_bos_embed", bos.numpy(), t["audio_bos_embed"], TOL_EMBED)
        trace = SpeechTrace(keep_steps=True)
        codes = synth.codes(self.meta["text"], self._spk(), synth.default_options(seed=0), trace=trace)
        yield close(n, "first_step_hidden", trace.step_hidden[0].numpy(), t["first_step_hidden"], TOL_EMBED)
        yield _logits(n, "first_step_logits", trace.step_logits[0].numpy(), t["first_step_logits"])
        yield from self._steps(trace)
        yield exact(n, "codes", codes.tolist(), t["codes"].tolist())
        yield exact(n, "prefill_calls", _calls(trace.prefill_calls, _PREFILL),
                    _calls(self.meta["prefill_calls"], _PREFILL))
        yield exact(n, "generate_calls", _calls(trace.generate_calls, _GENERATE),
                    _calls(self.meta["generate_calls"], _GENERATE))
        with torch.inference_mode():
            stages = tts.dvae.decode_stages(codes[None])
        yield close(n, "vq_feats", stages["vq_feats"][0].numpy(), t["vq_feats"], TOL_VQ)
        yield allclose(n, "mel", synth.mel(codes).numpy(), t["mel"], TOL_DECODE, TOL_DECODE)
        yield close(n, "wav", synth.waveform(codes).numpy(), t["wav"], TOL_WAV)

    def _steps(self, trace: SpeechTrace) -> Iterator[StageResult]:
        logits = torch.stack(trace.step_logits)  # [S, Q, V]
        top_vals, top_ids = torch.topk(logits, 8, dim=-1)  # [S, Q, 8]
        want = self.t["step_top8_logits"]
        yield _logits(self.name, "step_top8_logits", top_vals.numpy(), want)
        yield exact(self.name, "step_argmax", top_ids[..., 0].tolist(), self.t["step_top8_ids"][..., 0].tolist())
        visible = torch.stack(trace.step_visible).to(torch.uint8)  # [S, C]
        yield exact(self.name, "mask_visible", visible.tolist(), self.t["mask_visible"].tolist())

    def _decode(self, synth: SpeechSynthesizer) -> Iterator[StageResult]:
        n, t = self.name, self.t
        for prefix in ("random", "from_core"):
            codes = torch.from_numpy(t[f"{prefix}_codes"].astype(np.int64))
            with torch.inference_mode():
                stages = synth.tts.dvae.decode_stages(codes[None])
                backbone = synth.vocos.backbone(stages["mel"])[0]
            yield close(n, f"{prefix}/vq_feats", stages["vq_feats"][0].numpy(), t[f"{prefix}_vq_feats"], TOL_VQ)
            for key in ("decoder_out", "mel"):
                yield allclose(n, f"{prefix}/{key}", stages[key][0].numpy(), t[f"{prefix}_{key}"],
                               TOL_DECODE, TOL_DECODE)
            yield allclose(n, f"{prefix}/vocos_backbone", backbone.numpy(), t[f"{prefix}_vocos_backbone"],
                           TOL_DECODE, TOL_DECODE)
            yield close(n, f"{prefix}/wav", synth.waveform(codes).numpy(), t[f"{prefix}_wav"], TOL_WAV)
        for a in ("a", "c"):
            out0, out1 = crossfade(torch.from_numpy(t[f"xf_{a}"]), torch.from_numpy(t["xf_b"]),
                                   self.meta["crossfade"]["overlap"])
            yield close(n, f"crossfade_{a}b/out0", out0.numpy(), t[f"xf_{a}b_out0"], TOL_XFADE)
            yield close(n, f"crossfade_{a}b/out1", out1.numpy(), t[f"xf_{a}b_out1"], TOL_XFADE)

    def _streaming(self, synth: SpeechSynthesizer, first_chunk: str) -> Iterator[StageResult]:
        n, meta = self.name, self.meta
        trace = SpeechTrace()
        session = LiveSession(self.cm, speech_options=synth.default_options(seed=0), speech_trace=trace,
                              first_chunk=first_chunk)  # type: ignore[arg-type]
        chunks = list(session.say(meta["llm_text_pieces"], voice=self._spk()))
        codes = None if trace.codes is None else trace.codes.tolist()
        yield exact(n, "codes", codes, self.t["codes"].tolist())
        yield exact(n, "chunk_lens", [len(c.audio_wav) for c in chunks], [c["wav_len"] for c in meta["chunks"]])
        yield exact(n, "chunk_texts", [c.text for c in chunks], [c["text"] for c in meta["chunks"]])
        for i, c in enumerate(chunks[: len(meta["chunks"])]):
            yield close(n, f"chunk_{i}_wav", c.audio_wav, self.t[f"chunk_{i}_wav"], TOL_WAV)
        yield exact(n, "text_calls", _calls(trace.text_calls, ("text_in", "tts_token_len")),
                    _calls(meta["prepare_tts_text_calls"], ("text_in", "tts_token_len")))
        yield exact(n, "prefill_calls", _calls(trace.prefill_calls, _PREFILL), _calls(meta["prefill_calls"], _PREFILL))
        yield exact(n, "generate_calls", _calls(trace.generate_calls, _GENERATE),
                    _calls(meta["generate_calls"], _GENERATE))

    def _sampler_flat(self, synth: SpeechSynthesizer) -> Iterator[StageResult]:
        n, t = self.name, self.t
        tts = copy.deepcopy(synth.tts)
        with torch.no_grad():
            for head in tts.head_code:
                head.parametrizations.weight.original0.mul_(torch.tensor(FLAT_HEAD_SCALE, dtype=torch.float32))
        flat = SpeechSynthesizer(tts, synth.vocos, synth.tokenizer)
        trace = SpeechTrace(keep_steps=True)
        forced = torch.from_numpy(t["sampled_codes"].astype(np.int64))
        flat.codes(self.meta["text"], self._spk(), flat.default_options(max_frames=800), trace=trace, forced=forced)
        steps = forced.shape[0]
        probs = torch.stack(trace.step_probs[:steps]).numpy()  # [S, Q, V]
        yield close(n, "step_probs", probs, t["step_probs"], TOL_PROBS)
        yield exact(n, "nonzero_count", (probs > 0).sum(-1).tolist(), t["nonzero_count"].tolist())
        raw = torch.stack(trace.step_logits[:3]).numpy()
        yield _logits(n, "raw_logits_first3", raw, t["raw_logits_first3"])
        calls = [c for c in trace.generate_calls if c["new_ids_total"] <= steps and not c["finished"]]
        want = [c for c in self.meta["generate_calls"] if c["new_ids_total"] <= steps]
        yield exact(n, "generate_calls", _calls(calls, _GENERATE), _calls(want, _GENERATE))

    def _e2e(self, synth: SpeechSynthesizer) -> Iterator[StageResult]:
        n, t, meta, cm = self.name, self.t, self.meta, self.cm
        call = {"num_beams": 1, "repetition_penalty": 1.0}
        params = SamplingParams.from_official(cm.version, sampling=False, max_new_tokens=16, overrides=call)
        with torch.inference_mode():
            batch = cm.prepare([meta["msgs"]], use_tts_template=True)
            ids = cm.runner.generate_ids(batch, params)[0]
        yield exact(n, "prompt", batch.inputs.prompts[0], meta["prompt"])
        yield exact(n, "input_ids", batch.input_ids[0].tolist(), t["input_ids"].tolist())
        yield exact(n, "llm_generated_ids", ids, t["llm_generated_ids"].tolist())
        raw = official_answer_text(cm.tokenizer, ids, cm.terminator_ids())
        yield exact(n, "answer_text", raw, meta["answer_text"])
        yield exact(n, "tts_input_text", speech_text(raw), meta["tts_input_text"])
        yield close(n, "spk_hidden", speaker_hidden(cm, batch).numpy(), t["spk_hidden"], TOL_EMBED)
        cond = synth.tts_text(speech_text(raw))
        yield exact(n, "tts_token_len", cond.n_tokens, meta["tts_token_len"])
        yield exact(n, "tts_input_ids", cond.ids, t["tts_input_ids"].tolist())
        trace = SpeechTrace(keep_steps=True)
        out = cm.chat(meta["msgs"], **call, sampling=False, max_new_tokens=16, use_tts_template=True,
                      generate_audio=True, return_spk_embed=True, speech_options=synth.default_options(seed=0),
                      speech_trace=trace)
        yield exact(n, "chat_text", out.text, meta["answer_text"].replace("<|tts_eos|>", ""))
        spk = out.spk_embeds[0].numpy() if out.spk_embeds is not None else np.zeros(0, np.float32)
        yield close(n, "chat_spk_embeds", spk, t["spk_hidden"], TOL_EMBED)
        yield _logits(n, "first_step_logits", trace.step_logits[0].numpy(), t["first_step_logits"])
        yield exact(n, "codes", None if trace.codes is None else trace.codes.tolist(), t["codes"].tolist())
        yield exact(n, "prefill_calls", _calls(trace.prefill_calls, _PREFILL), _calls(meta["prefill_calls"], _PREFILL))
        yield exact(n, "generate_calls", _calls(trace.generate_calls, _GENERATE),
                    _calls(meta["generate_calls"], _GENERATE))
        wav = out.audio_wav if out.audio_wav is not None else np.zeros(0, dtype=np.float32)
        yield exact(n, "wav_len", (len(wav), out.sampling_rate), (meta["wav_len"], meta["sampling_rate"]))
        yield close(n, "wav", wav, t["wav"], TOL_WAV)
