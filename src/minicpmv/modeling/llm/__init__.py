"""LLM backbones by family name (``VersionSpec.llm_family``) and a builder that checks the name."""

from __future__ import annotations

from ...config import TextConfig
from ...errors import ConfigError
from .decoder import DecoderForCausalLM
from .llama import LlamaForCausalLM
from .minicpm import MiniCPMForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM

BACKBONES: dict[str, type[DecoderForCausalLM]] = {
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "llama": LlamaForCausalLM,
    "minicpm": MiniCPMForCausalLM,
}


def build_backbone(cfg: TextConfig) -> DecoderForCausalLM:
    """Instantiate the backbone class of ``cfg.family``; ConfigError for an unknown family."""
    cls = BACKBONES.get(cfg.family)
    if cls is None:
        raise ConfigError(
            f"LLM family {cfg.family!r} is not implemented; available: {', '.join(sorted(BACKBONES))}"
        )
    return cls(cfg)


__all__ = [
    "BACKBONES", "DecoderForCausalLM", "LlamaForCausalLM", "MiniCPMForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "build_backbone",
]
