"""The table of MiniCPM-V releases: everything that differs between versions, as data.

Each ``VersionSpec`` names the LLM backbone family, the resampler variant, the chat template to
fall back on when a checkpoint ships none, the terminator tokens, and the generation presets
that the official ``chat()`` hard-codes. Code elsewhere reads these fields; it never compares
version strings. ``detect_version`` reads the ``version`` field of config.json (no guessing from
paths or tensor sizes). This module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import UnknownVersionError

# Qwen2-Instruct template, used for 2.6 checkpoints whose tokenizer_config has no chat_template.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ChatML with the Qwen3 thinking switch and stripping of past reasoning; a compact equivalent of
# the released 4.5 template for the paths chat() can reach (no tools).
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- set reasoning = '' %}{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- if enable_thinking is defined and enable_thinking is true %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)

# MiniCPM-V 2.0: "<用户>" / "<AI>" turns without separators, then "<AI>" (spec 2.0 §2.6).
MINICPM20_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<用户>' }}"
    "{% else %}{{ '<AI>' }}{% endif %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}"
)

# MiniCPM-Llama3-V 2.5: the Llama 3 header template of its tokenizer_config (spec 2.5 §3.5).
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)

# MiniCPM-o 2.6 with audio in any message: ChatML without the default system message and the
# speech framing after the assistant header (spec o2.6 §4.5, "TTS template").
MINICPMO_AUDIO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>' }}{% endif %}"
)


def _frozen(d: dict[str, Any]) -> MappingProxyType:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class VideoPolicy:
    """How a video becomes frames for one release: the model card's recipe, as data.

    ``recipe`` names the sampling rule in ``processing/video.py``: ``"stride"`` (2.6: every
    round(native fps / fps)-th frame, then at most ``max_frames`` uniformly) or ``"packed"`` (4.5:
    ``fps`` frames per second, at most ``max_frames`` frame groups of up to ``max_packing`` frames,
    temporal ids in ``time_scale`` seconds). ``max_slice_nums`` / ``use_image_id`` are the
    per-call settings the recipe passes to chat() for the frames.
    """

    recipe: str
    fps: float
    max_frames: int
    max_packing: int = 1  # MAX_NUM_PACKING of the 4.5 recipe
    packing_limit: int = 1  # the largest packing the model accepts
    time_scale: float = 0.1  # seconds per temporal id step
    max_slice_nums: int = 1
    use_image_id: bool = False


@dataclass(frozen=True)
class VersionSpec:
    """One release of the family. All fields are data; see module docstring."""

    name: str
    config_versions: tuple[str, ...]  # values of config.json "version" that select this entry
    llm_family: str  # modeling/llm/<family>.py
    temporal_resampler: bool  # 4.5: 3D resampler (temporal ids, frame groups)
    supports_thinking: bool
    terminators: tuple[str, ...]  # token strings that end generation
    fallback_chat_template: str
    max_inp_length: int  # chat()'s default truncation length
    # chat(sampling=True) presets; the thinking preset applies when enable_thinking is on.
    sampling_preset: MappingProxyType
    thinking_sampling_preset: MappingProxyType
    # chat(sampling=False) preset: beam search.
    beam_preset: MappingProxyType
    # answers of thinking mode are prefixed with this text (non-stream and stream)
    thinking_prefix: str = "<think>\n"
    processor_temporal_ids: bool = False
    # transformers release whose beam search the reference vectors came from (their beam search
    # stops and pads differently; see engine/generate.py)
    hf_beam_compat: str = "4.55"
    unverified: bool = False  # no reference vectors exist for this version
    notes: tuple[str, ...] = field(default_factory=tuple)
    video: VideoPolicy | None = None  # frame sampling of the model card's video recipe
    # --- older releases (2.0, 2.5, o2.6, 4.0); defaults describe 2.6 / 4.5 ---
    display_name: str = ""  # the release's public name, e.g. "MiniCPM-Llama3-V 2.5"
    model_types: tuple[str, ...] = ("minicpmv",)  # config.json "model_type" values of this release
    # config keys that identify a release whose config.json has no "version" field (2.0)
    marker_keys: tuple[str, ...] = ()
    vision_tower: str = "navit"  # "navit" (2.6+) | "idefics2" (2.5) | "timm_siglip" (2.0)
    resampler_query_pos: bool = False  # 2.0: a stored position table added to the queries
    placeholder_scheme: str = "per_slice"  # see processing/placeholders.py: "per_slice" | "wrapped"
    max_images: int | None = None  # images per conversation the release accepts (2.0: 1)
    system_prompt: bool = True  # whether a system prompt exists at all (2.0: none)
    system_role_in_msgs: bool = False  # o2.6: msgs may start with a {"role": "system"} message
    prompt_masks_id0: bool = True  # the attention mask hides prompt tokens with id 0 (spec §16.1)
    strip_from_answer: tuple[str, ...] = ()  # token strings removed from answers (o2.6 <|tts_eos|>)
    strip_answer: bool = True  # answers are .strip()-ed (o2.6's chat() does not)
    audio_input: bool = False  # o2.6: audio clips in msgs (Whisper encoder)
    # o2.6: template used when a message holds audio (no default system message, TTS framing)
    audio_chat_template: str | None = None

    @property
    def title(self) -> str:
        """Human-readable release name ("MiniCPM-V 2.6" when no display name is set)."""
        return self.display_name or f"MiniCPM-V {self.name}"

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ModelConfig.from_hf_dict`` that this release decides."""
        return {"family": self.llm_family, "temporal": self.temporal_resampler,
                "vision_tower": self.vision_tower, "resampler_query_pos": self.resampler_query_pos}


_SAMPLING_26 = {"do_sample": True, "top_p": 0.8, "top_k": 100, "temperature": 0.7,
                "repetition_penalty": 1.05}
_SAMPLING_45 = {"do_sample": True, "top_p": 0.8, "top_k": 100, "temperature": 0.7,
                "repetition_penalty": 1.03}
# enable_thinking=True: only temperature is set, so the HF defaults (top_k 50, top_p 1) apply.
_SAMPLING_45_THINK = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 1.0,
                      "repetition_penalty": 1.0}
_BEAM = {"num_beams": 3, "repetition_penalty": 1.2}

VERSIONS: MappingProxyType = _frozen(
    {
        "2.0": VersionSpec(
            name="2.0",
            display_name="MiniCPM-V 2.0",
            config_versions=("2.0",),
            marker_keys=("vision_encoder",),  # the official config.json has no "version" field
            llm_family="minicpm",
            temporal_resampler=False,
            supports_thinking=False,
            terminators=("</s>",),
            fallback_chat_template=MINICPM20_CHAT_TEMPLATE,
            max_inp_length=2048,
            sampling_preset=_frozen(_SAMPLING_26),
            thinking_sampling_preset=_frozen(_SAMPLING_26),
            beam_preset=_frozen(_BEAM),
            hf_beam_compat="4.44",  # vectors: transformers 4.40 (same beam search as 4.44)
            vision_tower="timm_siglip",
            resampler_query_pos=True,
            placeholder_scheme="wrapped",
            max_images=1,
            system_prompt=False,
            prompt_masks_id0=False,  # generate() gets no attention mask; <unk> (id 0) is the placeholder
            notes=("one image per conversation (as the official chat()'s image= argument), no system prompt; "
                   "the tokenizer needs the [legacy] extra (sentencepiece)",),
        ),
        "2.5": VersionSpec(
            name="2.5",
            display_name="MiniCPM-Llama3-V 2.5",
            config_versions=("2.5",),
            llm_family="llama",
            temporal_resampler=False,
            supports_thinking=False,
            terminators=("<|end_of_text|>", "<|eot_id|>"),
            fallback_chat_template=LLAMA3_CHAT_TEMPLATE,
            max_inp_length=2048,
            sampling_preset=_frozen(_SAMPLING_26),
            thinking_sampling_preset=_frozen(_SAMPLING_26),
            beam_preset=_frozen(_BEAM),
            hf_beam_compat="4.44",  # vectors: transformers 4.40
            vision_tower="idefics2",
            placeholder_scheme="wrapped",
            prompt_masks_id0=False,  # generate() gets no attention mask
            notes=("the official chat() raises without an image; minicpmv answers text-only prompts "
                   "the way the official lower-level generate() path does",
                   "as in the reference, an image's vision features depend on the longest slice encoded "
                   "with it (padded patches are not masked)"),
        ),
        "2.6": VersionSpec(
            name="2.6",
            config_versions=("2.6",),
            llm_family="qwen2",
            temporal_resampler=False,
            supports_thinking=False,
            terminators=("<|im_end|>", "<|endoftext|>"),
            fallback_chat_template=QWEN2_CHAT_TEMPLATE,
            max_inp_length=8192,
            sampling_preset=_frozen(_SAMPLING_26),
            thinking_sampling_preset=_frozen(_SAMPLING_26),
            beam_preset=_frozen(_BEAM),
            hf_beam_compat="4.44",
            # model card: 1 frame per second, at most 64 frames, use_image_id=False, max_slice_nums=2
            video=VideoPolicy(recipe="stride", fps=1.0, max_frames=64, max_slice_nums=2),
        ),
        "o2.6": VersionSpec(
            name="o2.6",
            display_name="MiniCPM-o 2.6",
            config_versions=("2.6",),
            model_types=("minicpmo",),
            llm_family="qwen2",
            temporal_resampler=False,
            supports_thinking=False,
            terminators=("<|im_end|>", "<|endoftext|>"),
            fallback_chat_template=QWEN2_CHAT_TEMPLATE,
            max_inp_length=32768,
            sampling_preset=_frozen(_SAMPLING_26),
            thinking_sampling_preset=_frozen(_SAMPLING_26),
            beam_preset=_frozen(_BEAM),
            hf_beam_compat="4.44",
            system_role_in_msgs=True,
            strip_from_answer=("<|tts_eos|>",),
            strip_answer=False,
            prompt_masks_id0=False,  # MiniCPMOProcessor's mask hides left padding only
            audio_input=True,
            audio_chat_template=MINICPMO_AUDIO_CHAT_TEMPLATE,
            # same vision stack and video recipe as MiniCPM-V 2.6
            video=VideoPolicy(recipe="stride", fps=1.0, max_frames=64, max_slice_nums=2),
            notes=("audio input: 16 kHz mono clips (numpy arrays or WAV files), at most 600 s each by default; "
                   "speech output (24 kHz, voice cloning, streaming) through minicpmv.engine.speech; "
                   "chat(generate_audio=True) is not wired yet",),
        ),
        "4.0": VersionSpec(
            name="4.0",
            display_name="MiniCPM-V 4.0",
            config_versions=("4.0",),
            llm_family="llama",
            temporal_resampler=False,
            supports_thinking=False,
            terminators=("<|im_end|>", "</s>"),
            fallback_chat_template=QWEN2_CHAT_TEMPLATE,
            max_inp_length=8192,
            sampling_preset=_frozen(_SAMPLING_26),
            thinking_sampling_preset=_frozen(_SAMPLING_26),
            beam_preset=_frozen(_BEAM),
            hf_beam_compat="4.44",
            unverified=True,
            video=VideoPolicy(recipe="stride", fps=1.0, max_frames=64, max_slice_nums=2),
            notes=("built from the spec delta to 2.6 (Llama backbone); no reference vectors exist",),
        ),
        "4.5": VersionSpec(
            name="4.5",
            config_versions=("4.5",),
            llm_family="qwen3",
            temporal_resampler=True,
            supports_thinking=True,
            terminators=("<|im_end|>", "<|endoftext|>"),
            fallback_chat_template=QWEN3_CHAT_TEMPLATE,
            max_inp_length=16384,
            sampling_preset=_frozen(_SAMPLING_45),
            thinking_sampling_preset=_frozen(_SAMPLING_45_THINK),
            beam_preset=_frozen(_BEAM),
            processor_temporal_ids=True,
            # model card: encode_video(path, 5) with MAX_NUM_FRAMES=180, MAX_NUM_PACKING=3 (1..6),
            # TIME_SCALE=0.1; chat(use_image_id=False, max_slice_nums=1, temporal_ids=groups)
            video=VideoPolicy(recipe="packed", fps=5.0, max_frames=180, max_packing=3, packing_limit=6,
                              time_scale=0.1, max_slice_nums=1),
        ),
    }
)


def known_versions() -> list[str]:
    return list(VERSIONS)


def get_version(name: str | float) -> VersionSpec:
    """Look a version up by name ("2.6", 4.5, "o2.6", ...); raise UnknownVersionError listing known ones."""
    key = _normalise(name)
    for spec in VERSIONS.values():
        if key == spec.name:
            return spec
    for spec in VERSIONS.values():
        if key in spec.config_versions:
            return spec
    raise UnknownVersionError(
        f"unknown MiniCPM-V version {name!r}; known versions: {', '.join(known_versions())}"
    )


def detect_version(config: dict[str, Any]) -> VersionSpec:
    """The version of a checkpoint, from the ``version`` and ``model_type`` fields of its config.json.

    A config without ``version`` is recognised only by the declared ``marker_keys`` of a release
    (MiniCPM-V 2.0's official config names its timm vision encoder instead of a version).
    """
    model_type = str(config.get("model_type") or "minicpmv")
    if "version" not in config:
        marked = [s for s in VERSIONS.values()
                  if s.marker_keys and all(k in config for k in s.marker_keys) and model_type in s.model_types]
        if len(marked) == 1:
            return marked[0]
        raise UnknownVersionError(
            "config.json has no 'version' field, so the MiniCPM-V release cannot be determined; "
            f"known versions: {', '.join(known_versions())}. Pass version=... to load() to force one."
        )
    key = _normalise(config["version"])
    for spec in VERSIONS.values():
        if key in spec.config_versions and model_type in spec.model_types:
            return spec
    known = ", ".join(f"{v} ({'/'.join(s.model_types)})" for v, s in VERSIONS.items())
    raise UnknownVersionError(
        f"unknown MiniCPM-V version {config['version']!r} with model_type {model_type!r}; "
        f"known versions: {', '.join(known_versions())} [{known}]"
    )


def _normalise(v: str | float) -> str:
    s = str(v).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    return f"{f:g}" if "." in f"{f:g}" else f"{f:.1f}"


# ---------------------------------------------------------------------------- docs table

_VISION_NAMES = {"navit": "SigLIP (NaViT)", "idefics2": "SigLIP (Idefics2, 1-row)", "timm_siglip": "SigLIP (timm)"}


def capabilities(spec: VersionSpec) -> dict[str, bool]:
    """What works with a release in minicpmv, derived from its table entry only."""
    return {
        "image": True,
        "multi-image": spec.max_images is None or spec.max_images > 1,
        "video": spec.video is not None,
        "audio in": spec.audio_input,
        "thinking": spec.supports_thinking,
        "system prompt": spec.system_prompt,
        "streaming": True,  # minicpmv's engine streams every release (2.0's reference cannot)
        "beam search": bool(spec.beam_preset.get("num_beams", 1) > 1),
        "verified": not spec.unverified,
    }


def versions_markdown() -> str:
    """The support table of ``docs/versions.md``, generated from ``VERSIONS`` (see scripts there)."""
    caps = {name: capabilities(spec) for name, spec in VERSIONS.items()}
    cols = list(next(iter(caps.values())))
    head = ["release", "config `version`", "LLM backbone", "vision tower", *cols]
    lines = [
        "# Supported releases",
        "",
        "<!-- generated by minicpmv.versions.versions_markdown(); regenerate with",
        "     python -m minicpmv.versions > docs/versions.md  (tests check it is current) -->",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, spec in VERSIONS.items():
        marks = ["yes" if caps[name][c] else "no" for c in cols]
        cfg = "/".join(spec.config_versions)
        if spec.model_types != ("minicpmv",):
            cfg += f" ({spec.model_types[0]})"
        if spec.marker_keys:
            cfg = f"none (`{spec.marker_keys[0]}`)"
        row = [spec.title, cfg, spec.llm_family, _VISION_NAMES.get(spec.vision_tower, spec.vision_tower), *marks]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Notes:", ""]
    for spec in VERSIONS.values():
        for note in spec.notes:
            lines.append(f"- {spec.title}: {note}")
    lines += ["- streaming and beam search are minicpmv features for every release; `verified` means the "
              "release passes the reference conformance vectors"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m minicpmv.versions > docs/versions.md
    print(versions_markdown(), end="")
