"""Conformance cases in the second vector format (MiniCPM-V 2.0, 2.5 and MiniCPM-o 2.6).

Layout (``README-2.0-2.5-o2.6.md`` of the vectors): ``inputs/`` holds msgs.json (content lists
with ``"__IMG__"`` / ``"__AUDIO__"`` markers for ``image_<k>.png`` / ``audio_<k>.npy``),
params.json (the official call: ``image``, ``system_prompt``, ``chat_kwargs``) and the media;
``expected/`` holds prompt.txt, chat_template_output.txt (2.5, o2.6), slice_0.png, meta.json
(bounds, per-slice hashes, decoded texts) and tensors.npz. ``NpzCaseRunner`` feeds the inputs
through the loaded float32 ``ChatModel`` and yields one ``StageResult`` per stage, with the
tolerances of that README. Used by ``conformance.run_cases``; nothing in the library imports it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine.chat import ChatModel, normalise_msgs
from ..engine.sampling import SamplingParams
from ..errors import MiniCPMVError
from .common import StageResult, allclose, close, exact

TOL = 1e-4  # resampler, audio encoder, audio embeddings (atol and rtol)
TOL_FEATURES = 1e-4  # log-mel
TOL_VISION = (5e-3, 1e-2)  # fp16-stored vision output: atol, rtol
TOL_LOGITS = 1e-3
GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 16}
BEAM = {"sampling": False, "max_new_tokens": 12}  # the official non-sampling default: 3 beams, rep 1.2


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

    def run(self) -> Iterator[StageResult]:
        conversations, _ = normalise_msgs(self.msgs, self.image)
        inputs = self.cm.processor(conversations, **self.proc_kwargs)
        yield from self._prompt_stages(inputs)
        yield from self._slice_stages(inputs)
        with torch.inference_mode():
            yield from self._vision_stages(inputs)
            yield from self._audio_stages(inputs)
            batch = self.cm.runner.prepare(inputs)
            logits = self.cm.model(batch.inputs_embeds, None, batch.attention_mask)[0, -1]  # [V]
            yield close(self.name, "prefill_logits", logits.numpy(), self.t["prefill_last_logits"], TOL_LOGITS)
            yield from self._generation_stages(batch)

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

    def _vision_stages(self, inputs: Any) -> Iterator[StageResult]:
        if "vision_0" not in self.t:
            return
        model = self.cm.model
        pv = [torch.from_numpy(p) for p in inputs.pixel_values[0]]
        tgt = torch.tensor(inputs.tgt_sizes[0], dtype=torch.long)  # [S, 2]
        feats = model.vpm.encode_slices(pv, tgt, batch_size=model.config.vision_batch_size)  # [S, Lmax, Dv]
        n0 = int(tgt[0, 0] * tgt[0, 1])
        yield allclose(self.name, "vision_0", feats[0, :n0].numpy(), self.t["vision_0"], *TOL_VISION)
        res = model.resampler(feats, tgt)  # [S, Q, H]
        want = self.t["resampler"]
        yield allclose(self.name, "resampler", res[: want.shape[0]].numpy(), want, TOL, TOL)

    def _audio_stages(self, inputs: Any) -> Iterator[StageResult]:
        if "audio_features" not in self.t:
            return
        segs = inputs.audio_features[0]
        lens = [int(s.shape[1]) for s in segs]
        yield exact(self.name, "audio_feature_lens", lens, self.t["audio_feature_lens"].tolist())
        padded = np.zeros((len(segs), segs[0].shape[0], max(lens)), dtype=np.float32)
        for i, s in enumerate(segs):
            padded[i, :, : s.shape[1]] = s
        yield close(self.name, "audio_features", padded, self.t["audio_features"], TOL_FEATURES)
        tensors = [torch.from_numpy(s) for s in segs]
        hidden, _ = self.cm.model.audio_hidden(tensors)  # [n, T, d]
        yield allclose(self.name, "apm_last_hidden", hidden.numpy(), self.t["apm_last_hidden"], TOL, TOL)
        emb = torch.cat(self.cm.model.encode_audio(tensors))  # [T_total, H]
        yield allclose(self.name, "audio_embeds", emb.numpy(), self.t["audio_embeds"], TOL, TOL)

    def _params(self, call: dict[str, Any]) -> Any:
        kw = dict(call)
        return SamplingParams.from_official(
            self.cm.version, sampling=kw.pop("sampling"), max_new_tokens=kw.pop("max_new_tokens"), overrides=kw)

    def _generation_stages(self, batch: Any) -> Iterator[StageResult]:
        steps = self.cm.runner.steps(batch, self._params(GREEDY))
        greedy = [int(s.tokens[0]) for s in steps]
        yield exact(self.name, "greedy_ids", greedy, self.t["greedy_ids"].tolist())
        yield exact(self.name, "greedy_text", self.cm.runner.postprocess(greedy), self.meta["greedy_text"])
        beam = self.cm.runner.generate_ids(batch, self._params(BEAM))[0]
        want = self.t["beam_ids"].tolist()
        trimmed = beam[: len(want)] if all(t == 0 for t in beam[len(want):]) else beam
        yield exact(self.name, "beam_ids", trimmed, want)
        yield exact(self.name, "beam_text", self.cm.runner.postprocess(beam), self.meta["beam_text"])
