"""Golden-vector cases in the first format (``expected/tensors.safetensors``; 2.6 and 4.5).

A case directory holds ``inputs/`` (msgs.json, params.json, images) and ``expected/``
(meta.json, tensors.safetensors, slices/*.png) in the format documented in
``tests/data/conformance/README.md``; cases with ``expected/tensors.npz`` (2.0, 2.5,
o2.6) are run by ``conformance_npz.NpzCaseRunner`` instead (``make_runner`` picks).
``CaseRunner`` feeds the inputs of a case through the loaded float32 model: our processor, the
model's own ``encode_features`` (the vision tower output the resampler read there is tapped for
the vision stages), the embedding merge and generator, and finally ``ChatModel.chat()`` itself,
called as the reference was, against ``greedy_answer`` / ``beam_answer``; the ``generate``
kwargs the reference recorded are compared with our decoding settings. Slice PNGs are matched
to pixel_values entries through ``pixel_values_source_slice`` (the PNGs are in frame order, the
entries in processor order). One ``StageResult`` per stage.
This module is a tool on top of the public API; nothing in the library imports it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file

from ..engine.chat import ChatModel, normalise_msgs
from ..engine.compat import thinking_flag
from ..engine.features import FeatureCache
from ..engine.sampling import SamplingParams
from ..errors import MiniCPMVError
from .common import StageResult, close, exact, features_and_vision, generate_kwargs, unpad, worst_error

log = logging.getLogger(__name__)

TOL_TENSOR = 1e-4  # vision, resampler, logits (fp32), see the vectors' README
TOL_SUM = 1e-3  # column / row sums
RTOL_PIXEL_STATS = 1e-9


def load_case_msgs(case_dir: Path) -> tuple[Any, dict[str, Any]]:
    """msgs.json with image items turned into PIL images; and params.json."""
    params = json.loads((case_dir / "inputs" / "params.json").read_text())
    raw = json.loads((case_dir / "inputs" / "msgs.json").read_text())

    def conv(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            items: list[Any] = []
            for it in m["content"]:
                if it["type"] == "image":
                    with Image.open(case_dir / it["file"]) as im:
                        items.append(im.convert("RGB"))
                else:
                    items.append(it["text"])
            out.append({"role": m["role"], "content": items})
        return out

    msgs = [conv(c) for c in raw] if params.get("batched") else conv(raw)
    return msgs, params


class CaseRunner:
    """Runs all stages of one case against a loaded fp32 ChatModel."""

    def __init__(self, chat_model: ChatModel, case_dir: Path, *, feature_cache: FeatureCache | None = None) -> None:
        self.cm = chat_model
        self.features = feature_cache  # resampler outputs shared with other runs of the same cases
        self.dir = case_dir
        self.name = f"{case_dir.parent.name}/{case_dir.name}"
        self.meta = json.loads((case_dir / "expected" / "meta.json").read_text())
        self.t = load_file(str(case_dir / "expected" / "tensors.safetensors"))
        self.msgs, self.params = load_case_msgs(case_dir)
        kw = dict(self.params.get("chat_kwargs") or {})
        self.system_prompt = kw.pop("system_prompt", "")
        self.enable_thinking = bool(kw.pop("enable_thinking", False))
        self.proc_kwargs = dict(
            system_prompt=self.system_prompt,
            max_slice_nums=kw.pop("max_slice_nums", None),
            use_image_id=kw.pop("use_image_id", None),
            temporal_ids=kw.pop("temporal_ids", None),
            enable_thinking=thinking_flag(self.cm.version, self.enable_thinking),
        )
        if kw:
            raise MiniCPMVError(f"{self.name}: unknown chat_kwargs {sorted(kw)}")

    def run(self) -> Iterator[StageResult]:
        conversations, _ = normalise_msgs(self.msgs, None)
        inputs = self.cm.processor(conversations, **self.proc_kwargs)
        yield from self._prompt_stages(inputs)
        yield from self._pixel_stages(inputs)
        with torch.inference_mode():
            features, vision = features_and_vision(self.cm, inputs, self.features)
            yield from self._vision_stages(vision, features)
            batch = self.cm.runner.prepare(inputs, features=features)
            yield exact(self.name, "attention_mask", batch.attention_mask.tolist(),
                         self.t["attention_mask"].tolist())
            e = batch.inputs_embeds.double()
            yield close(self.name, "embeds", torch.stack([e.sum(-1), e.abs().sum(-1)]).numpy(),
                         np.stack([self.t["embeds_rowsum"], self.t["embeds_rowabssum"]]), TOL_SUM)
            yield from self._greedy_stages(batch)
            if self.params.get("beam_kwargs"):
                yield from self._beam_stage(batch)
        yield from self._chat_stages()

    def greedy_setup(self) -> tuple[Any, SamplingParams]:
        """The case's prepared batch and greedy settings, to run its greedy stage another way (a
        compiled decode step, another device); ``expected["greedy_ids"]`` is what it must give."""
        conversations, _ = normalise_msgs(self.msgs, None)
        inputs = self.cm.processor(conversations, **self.proc_kwargs)
        with torch.inference_mode():
            batch = self.cm.runner.prepare(inputs, feature_cache=self.features)
        return batch, self._gen_params(self.params["greedy_kwargs"])

    @property
    def expected(self) -> dict[str, np.ndarray]:
        """The case's reference tensors (``greedy_ids`` [B, n], ``step_logits``, ...)."""
        return self.t

    def _prompt_stages(self, inputs: Any) -> Iterator[StageResult]:
        m = self.meta
        yield exact(self.name, "template", inputs.prompts, m["chat_template_prompts"])
        yield exact(self.name, "expanded", inputs.expanded_prompts, m["expanded_prompts"])
        ids = inputs.input_ids
        want = [list(row) for row in m["input_ids"]]
        got = [[0] * (len(w) - len(g)) + list(g) for g, w in zip(ids, want, strict=True)]
        yield exact(self.name, "input_ids", got, want)
        pads = [len(w) - len(g) for g, w in zip(ids, want, strict=True)]
        bounds = [[[s + p, e + p] for s, e in b] for b, p in zip(inputs.image_bounds, pads, strict=True)]
        yield exact(self.name, "image_bound", bounds, m["image_bound"])
        yield exact(self.name, "tgt_sizes", [[list(s) for s in ts] for ts in inputs.tgt_sizes], m["tgt_sizes"])
        if m.get("temporal_ids_from_processor") is not None:
            yield exact(self.name, "temporal_ids", inputs.temporal_ids, m["temporal_ids_from_processor"])

    def _pixel_stages(self, inputs: Any) -> Iterator[StageResult]:
        slices = [s for conv in inputs.slices for s in conv]  # processor order
        source = self.meta.get("pixel_values_source_slice") or list(range(len(self.meta["slice_index"])))
        bad: list[Any] = []
        for k, png in enumerate(source):
            with Image.open(self.dir / "expected" / "slices" / f"slice_{png:03d}.png") as im:
                want = np.asarray(im.convert("RGB"))
            got = np.asarray(slices[k]) if k < len(slices) else None
            if got is None or got.shape != want.shape or not np.array_equal(got, want):
                bad.append(k)
        if len(slices) != len(source):
            bad.append(f"count {len(slices)} != {len(source)}")
        yield StageResult(self.name, "slices", not bad, note=f"mismatching entries {bad}" if bad else "")
        flat = [p for conv in inputs.pixel_values for p in conv]
        if not flat:
            return
        stats = np.array([_pixel_stats(p) for p in flat])
        want = self.t["pixel_values_stats"]
        ok = stats.shape == want.shape and np.allclose(stats, want, rtol=RTOL_PIXEL_STATS, atol=0)
        err = float(np.max(np.abs(stats - want))) if stats.shape == want.shape else None
        yield StageResult(self.name, "pixel_values", ok, err, RTOL_PIXEL_STATS, note="(rtol)")

    def _vision_stages(self, vision: list[torch.Tensor], features: list[torch.Tensor | None]) -> Iterator[StageResult]:
        """``vision``: per slice [L_s, Dv], what the resampler read inside encode_features."""
        if not vision:
            return
        n = sum(1 for k in self.t if k.startswith("vpm_out_"))
        if len(vision) != n:
            yield StageResult(self.name, "vision", False, note=f"{len(vision)} slices, expected {n}")
            return
        pairs = [(v[torch.from_numpy(self.t[f"vpm_rows_{s:03d}"])].double().numpy(), self.t[f"vpm_out_{s:03d}"])
                 for s, v in enumerate(vision)]
        worst = worst_error(pairs)  # NaN fails
        yield StageResult(self.name, "vision", worst <= TOL_TENSOR, worst, TOL_TENSOR)
        colsum = np.stack([v.double().sum(0).numpy() for v in vision])
        yield close(self.name, "vision_colsum", colsum, self.t["vpm_colsum"], TOL_SUM)
        feats = torch.cat([f for f in features if f is not None]).double()  # [N, Q, D]
        rows = torch.from_numpy(self.t["resampler_rows"])
        yield close(self.name, "resampler", feats[:, rows].numpy(), self.t["resampler_out_sel"], TOL_TENSOR)
        sums = np.concatenate([feats.sum(1).numpy(), feats.sum(2).numpy()], axis=1)
        want = np.concatenate([self.t["resampler_colsum"], self.t["resampler_rowsum"]], axis=1)
        yield close(self.name, "resampler_sums", sums, want, TOL_SUM)

    def _gen_params(self, kwargs: dict[str, Any]) -> Any:
        kw = dict(kwargs)
        sampling = kw.pop("sampling", True)
        return SamplingParams.from_official(
            self.cm.version, sampling=sampling, enable_thinking=self.enable_thinking,
            max_new_tokens=kw.pop("max_new_tokens", 2048), min_new_tokens=kw.pop("min_new_tokens", 0), overrides=kw,
        )

    def _greedy_stages(self, batch: Any) -> Iterator[StageResult]:
        params = self._gen_params(self.params["greedy_kwargs"])
        tokens, logits = [], []
        for step in self.cm.runner.steps(batch, params):
            tokens.append(step.tokens)
            logits.append(step.logits)
        got_ids = torch.stack(tokens, 1)  # [B, n]
        want_ids = self.t["greedy_ids"]
        n = got_ids.shape[1]
        want_logits = self.t["step_logits"][:, :n]
        yield close(self.name, "logits", torch.stack(logits, 1).numpy(), want_logits, TOL_TENSOR)
        padded = np.zeros_like(want_ids)
        padded[:, :n] = got_ids.numpy()[:, : want_ids.shape[1]]
        yield exact(self.name, "greedy_ids", padded.tolist(), want_ids.tolist())
        answers = [self.cm.runner.postprocess(r) for r in got_ids.tolist()]
        prefix = self.cm.version.thinking_prefix if self.enable_thinking else ""
        want = self.meta["greedy_answer"]
        got: Any = [prefix + a for a in answers]
        yield exact(self.name, "greedy_text", got if isinstance(want, list) else got[0], want)

    def _beam_stage(self, batch: Any) -> Iterator[StageResult]:
        params = self._gen_params(self.params["beam_kwargs"])
        want_kwargs = self.meta.get("beam_generate_kwargs")
        if want_kwargs is not None:
            got_kwargs = generate_kwargs(params, self.cm.runner.eos_ids, want_kwargs)
            yield exact(self.name, "beam_generate_kwargs", got_kwargs, want_kwargs)
        rows = self.cm.runner.generate_ids(batch, params)
        ends = self.cm.runner.eos_ids
        want = [unpad(w, ends) for w in self.t["beam_ids"].tolist()]  # batched rows are padded after their end
        yield exact(self.name, "beam_ids", [unpad(r, ends) for r in rows], want)

    def _chat_stages(self) -> Iterator[StageResult]:
        """``ChatModel.chat()`` called as the reference was, against its returned strings."""
        chat_kwargs = {k: v for k, v in self.proc_kwargs.items() if v is not None}  # the call's chat_kwargs
        answer = self.cm.chat(self.msgs, **chat_kwargs, **self.params["greedy_kwargs"])
        yield exact(self.name, "chat_greedy", answer, self.meta["greedy_answer"])
        want_kwargs = self.meta.get("generate_kwargs")
        if want_kwargs is not None:
            params = self._gen_params(self.params["greedy_kwargs"])
            got_kwargs = generate_kwargs(params, self.cm.runner.eos_ids, want_kwargs)
            yield exact(self.name, "generate_kwargs", got_kwargs, want_kwargs)
        if self.params.get("beam_kwargs"):
            beam = self.cm.chat(self.msgs, **chat_kwargs, **self.params["beam_kwargs"])
            yield exact(self.name, "chat_beam", beam, self.meta["beam_answer"])


def _pixel_stats(p: np.ndarray) -> list[float]:
    x = p.astype(np.float64)
    w = (np.arange(p.size) % 97).reshape(p.shape)
    return [float(x.sum()), float((x * x).sum()), float((x * w).sum()), float(p.size)]
