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


def _frozen(d: dict[str, Any]) -> MappingProxyType:
    return MappingProxyType(dict(d))


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
        ),
    }
)


def known_versions() -> list[str]:
    return list(VERSIONS)


def get_version(name: str | float) -> VersionSpec:
    """Look a version up by name ("2.6", 4.5, ...); raise UnknownVersionError listing known ones."""
    key = _normalise(name)
    for spec in VERSIONS.values():
        if key == spec.name or key in spec.config_versions:
            return spec
    raise UnknownVersionError(
        f"unknown MiniCPM-V version {name!r}; known versions: {', '.join(known_versions())}"
    )


def detect_version(config: dict[str, Any]) -> VersionSpec:
    """The version of a checkpoint, from the ``version`` field of its config.json."""
    if "version" not in config:
        raise UnknownVersionError(
            "config.json has no 'version' field, so the MiniCPM-V release cannot be determined; "
            f"known versions: {', '.join(known_versions())}. Pass version=... to load() to force one."
        )
    return get_version(config["version"])


def _normalise(v: str | float) -> str:
    s = str(v).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    return f"{f:g}" if "." in f"{f:g}" else f"{f:.1f}"
