"""Conformance cases in the second vector format (MiniCPM-V 2.0, 2.5 and MiniCPM-o 2.6).

Layout (``README-2.0-2.5-o2.6.md`` of the vectors): ``inputs/`` holds msgs.json (content lists
with ``"__IMG__"`` / ``"__AUDIO__"`` markers for ``image_<k>.png`` / ``audio_<k>.npy``),
params.json (the official call: ``image``, ``system_prompt``, ``chat_kwargs``) and the media;
``expected/`` holds prompt.txt, chat_template_output.txt (2.5, o2.6), slice_0.png, meta.json
(bounds, per-slice hashes, decoded texts) and tensors.npz. ``NpzCaseRunner`` feeds the inputs
through the loaded float32 ``ChatModel`` (vision, resampler and audio rows as the model's own
``encode_features`` produces them), decodes with the settings params.json records (greedy: its
``sampling`` / ``num_beams`` / ``repetition_penalty`` / ``max_new_tokens``; beam: the arguments
of its ``beam_call``), compares ``ChatModel.chat()`` itself with the texts the official chat()
returned, and yields one ``StageResult`` per stage with the tolerances of that README. Used by
``conformance.run_cases``; nothing in the library imports it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine.chat import ChatModel, normalise_msgs
from ..engine.sampling import SamplingParams
from ..errors import MiniCPMVError
from .common import StageResult, allclose, close, exact, features_and_vision, unpad

TOL = 1e-4  # resampler, audio encoder, audio embeddings (atol and rtol)
TOL_FEATURES = 1e-4  # log-mel
TOL_VISION = (5e-3, 1e-2)  # fp16-stored vision output: atol, rtol
TOL_LOGITS = 1e-3
GREEDY_KEYS = ("sampling", "num_beams", "repetition_penalty", "max_new_tokens")
_CALL_ARG = re.compile(r"(\w+)=(True|False|-?\d+(?:\.\d+)?)\b")


def decoding_settings(params: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(greedy chat() kwargs, beam chat() kwargs or None) as params.json records them: the greedy
    call's keys at the top level, the beam call as the text of ``beam_call``."""
    missing = [k for k in GREEDY_KEYS if k not in params]
    if missing:
        raise MiniCPMVError(f"{name}: params.json lacks the decoding settings {missing}")
    greedy = {k: params[k] for k in GREEDY_KEYS}
    call = params.get("beam_call")
    if not call:
        return greedy, None
    args = call.split("(", 1)[-1].split(")", 1)[0]
    beam: dict[str, Any] = {}
    for key, value in _CALL_ARG.findall(args):
        beam[key] = value == "True" if value in ("True", "False") else (float(value) if "." in value else int(value))
    if "sampling" not in beam or "max_new_tokens" not in beam:
        raise MiniCPMVError(f"{name}: cannot read the beam settings from beam_call {call!r}")
    return greedy, beam


def is_npz_case(case_dir: Path) -> bool:
    return (case_dir / "expected" / "tensors.npz").is_file()


def load_npz_case(case_dir: Path) -> tuple[list[dict[str, Any]], Image.Image | None, dict[str, Any]]:
    """(msgs with PIL images / numpy audio, the ``image=`` argument, params.json)."""
    inp = case_dir / "inputs"
    params = json.loads((inp / "params.json").read_text())
    raw = json.loads((inp / "msgs.json").read_text())
    images = iter(sorted(inp.glob("image_*.png"), key=lambda p: int(p.stem.split("_")[1])))
    audios = iter(sorted(inp.glob("audio_*.npy"), key=lambda p: int(p.stem.split("_")[1])))

    def item(x: Any) -> Any:
        if x == "__IMG__":
            with Image.open(next(images)) as im:
                return im.convert("RGB")
        if x == "__AUDIO__":
            return np.load(next(audios))
        return x

    msgs = [{"role": m["role"], "content": [item(x) for x in m["content"]]
             if isinstance(m["content"], list) else m["content"]} for m in raw]
    image = None
    if params.get("image"):
        with Image.open(inp / params["image"]) as im:
            image = im.convert("RGB")
    return msgs, image, params


class NpzCaseRunner:
    """Runs every stage of one second-format case against a loaded float32 ChatModel."""

    def __init__(self, chat_model: ChatModel, case_dir: Path) -> None:
        self.cm = chat_model
        self.dir = case_dir
        self.name = f"{case_dir.parent.name}/{case_dir.name}"
        exp = case_dir / "expected"
        self.meta = json.loads((exp / "meta.json").read_text())
        with np.load(exp / "tensors.npz") as npz:
            self.t = {k: npz[k] for k in npz.files}
        self.msgs, self.image, self.params = load_npz_case(case_dir)
        kw = dict(self.params.get("chat_kwargs") or {})
        self.proc_kwargs = {"system_prompt": self.params.get("system_prompt") or "",
                            "max_slice_nums": kw.pop("max_slice_nums", None),
                            "use_image_id": kw.pop("use_image_id", None)}
        for key in ("use_tts_template", "chunk_input"):  # MiniCPM-o chat() options
            if key in kw:
                self.proc_kwargs[key] = bool(kw.pop(key))
        if kw:
            raise MiniCPMVError(f"{self.name}: unknown chat_kwargs {sorted(kw)}")
        self.greedy, self.beam = decoding_settings(self.params, self.name)

    def run(self) -> Iterator[StageResult]:
        conversations, _ = normalise_msgs(self.msgs, self.image)
        inputs = self.cm.processor(conversations, **self.proc_kwargs)
        yield from self._prompt_stages(inputs)
        yield from self._slice_stages(inputs)
        with torch.inference_mode():
            features, vision = features_and_vision(self.cm, inputs)
            yield from self._vision_stages(inputs, features, vision)
            yield from self._audio_stages(inputs, features)
            batch = self.cm.runner.prepare(inputs, features=features)
            logits = self.cm.model(batch.inputs_embeds, None, batch.attention_mask)[0, -1]  # [V]
            yield close(self.name, "prefill_logits", logits.numpy(), self.t["prefill_last_logits"], TOL_LOGITS)
            yield from self._generation_stages(batch)
        yield from self._chat_stages()

    # ------------------------------------------------------------------ stages
    def _prompt_stages(self, inputs: Any) -> Iterator[StageResult]:
        tpl = self.dir / "expected" / "chat_template_output.txt"
        if tpl.is_file():
            yield exact(self.name, "template", inputs.prompts[0], tpl.read_text(encoding="utf-8"))
        prompt = (self.dir / "expected" / "prompt.txt").read_text(encoding="utf-8")
        yield exact(self.name, "expanded", inputs.expanded_prompts[0], prompt)
        yield exact(self.name, "input_ids", inputs.input_ids[0], self.t["input_ids"].tolist())
        yield exact(self.name, "image_bound", [list(b) for b in inputs.image_bounds[0]],
                     self.t["image_bound"].tolist())
        if "tgt_sizes" in self.t:
            yield exact(self.name, "tgt_sizes", [list(s) for s in inputs.tgt_sizes[0]], self.t["tgt_sizes"].tolist())
        if "audio_bounds" in self.t:
            yield exact(self.name, "audio_bounds", [list(b) for b in inputs.audio_bounds[0]],
                         self.t["audio_bounds"].tolist())

    def _slice_stages(self, inputs: Any) -> Iterator[StageResult]:
        want = self.meta.get("slices") or []
        if not want:
            return
        slices = [np.asarray(s) for s in inputs.slices[0]]
        bad = [k for k, s in enumerate(want)
               if k >= len(slices) or hashlib.sha256(slices[k].tobytes()).hexdigest() != s["u8_sha256"]]
        if len(slices) != len(want):
            bad.append(f"count {len(slices)} != {len(want)}")
        with Image.open(self.dir / "expected" / "slice_0.png") as im:
            png = np.asarray(im.convert("RGB"))
        if not slices or slices[0].shape != png.shape or not np.array_equal(slices[0], png):
            bad.append("slice_0.png")
        yield StageResult(self.name, "slices", not bad, note=f"mismatching {bad}" if bad else "")

    def _vision_stages(self, inputs: Any, features: list[torch.Tensor | None],
                       vision: list[torch.Tensor]) -> Iterator[StageResult]:
        if "vision_0" not in self.t:
            return
        got = vision[0].numpy() if vision else np.zeros((0,))
        yield allclose(self.name, "vision_0", got, self.t["vision_0"], *TOL_VISION)
        n_img, q = len(inputs.tgt_sizes[0]), self.cm.config.query_num
        rows = features[0][: n_img * q] if features[0] is not None else torch.zeros(0)  # image rows first
        want = self.t["resampler"]
        res = rows.reshape(n_img, q, -1)[: want.shape[0]]  # [<=2, Q, H]
        yield allclose(self.name, "resampler", res.numpy(), want, TOL, TOL)

    def _audio_stages(self, inputs: Any, features: list[torch.Tensor | None]) -> Iterator[StageResult]:
        if "audio_features" not in self.t:
            return
        segs = inputs.audio_features[0]
        lens = [int(s.shape[1]) for s in segs]
        yield exact(self.name, "audio_feature_lens", lens, self.t["audio_feature_lens"].tolist())
        padded = np.zeros((len(segs), segs[0].shape[0], max(lens)), dtype=np.float32)
        for i, s in enumerate(segs):
            padded[i, :, : s.shape[1]] = s
        yield close(self.name, "audio_features", padded, self.t["audio_features"], TOL_FEATURES)
        hidden, _ = self.cm.model.audio_hidden([torch.from_numpy(s) for s in segs])  # [n, T, d]
        yield allclose(self.name, "apm_last_hidden", hidden.numpy(), self.t["apm_last_hidden"], TOL, TOL)
        image_rows = len(inputs.tgt_sizes[0]) * self.cm.config.query_num
        emb = features[0][image_rows:] if features[0] is not None else torch.zeros(0)  # [T_total, H] after images
        yield allclose(self.name, "audio_embeds", emb.numpy(), self.t["audio_embeds"], TOL, TOL)

    def _params(self, call: dict[str, Any]) -> Any:
        kw = dict(call)
        return SamplingParams.from_official(
            self.cm.version, sampling=kw.pop("sampling"), max_new_tokens=kw.pop("max_new_tokens"), overrides=kw)

    def _generation_stages(self, batch: Any) -> Iterator[StageResult]:
        steps = self.cm.runner.steps(batch, self._params(self.greedy))
        greedy = [int(s.tokens[0]) for s in steps]
        yield exact(self.name, "greedy_ids", greedy, self.t["greedy_ids"].tolist())
        yield exact(self.name, "greedy_text", self.cm.runner.postprocess(greedy), self.meta["greedy_text"])
        if self.beam is None:
            return
        beam = self.cm.runner.generate_ids(batch, self._params(self.beam))[0]
        ends = self.cm.runner.eos_ids
        yield exact(self.name, "beam_ids", unpad(beam, ends), unpad(self.t["beam_ids"].tolist(), ends))
        yield exact(self.name, "beam_text", self.cm.runner.postprocess(beam), self.meta["beam_text"])

    def _chat_stages(self) -> Iterator[StageResult]:
        """``ChatModel.chat()`` called as the reference was, against the texts it returned (not for
        a case whose official chat() raised: its vectors come from a lower-level path)."""
        if self.meta.get("official_chat_error"):
            return
        kw = {k: v for k, v in self.proc_kwargs.items() if v is not None and k != "chunk_input"}
        yield exact(self.name, "chat_greedy", self.cm.chat(self.msgs, self.image, **kw, **self.greedy),
                    self.meta["greedy_text"])
        if self.beam is not None:
            yield exact(self.name, "chat_beam", self.cm.chat(self.msgs, self.image, **kw, **self.beam),
                        self.meta["beam_text"])
