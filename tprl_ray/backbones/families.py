"""One registry entry per model family: its transformers config class, how its adapter loads, its
vision FLOPs and its defaults (LLaVA: the prompt format). Loading and FLOPs accounting pick the
family here, by config class."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import LlavaConfig, PretrainedConfig, Qwen2_5_VLConfig

from tprl_ray.backbones.base import Backbone, BackboneError
from tprl_ray.backbones.llava import LlavaBackbone, llava_patches, llava_vision_flops
from tprl_ray.backbones.qwen import QwenBackbone, qwen_vision_flops
from tprl_ray.config import BackboneConfig


def _load_llava(path: str | Path, cfg: BackboneConfig) -> Backbone:
    """LLaVA with ``prompt_format: auto`` resolved: a tprl-trained checkpoint's card says its format."""
    prompt_format = cfg.prompt_format
    if prompt_format == "auto":
        card = Path(path) / "tprl_model_card.json"
        prompt_format = (
            json.loads(card.read_text()).get("prompt_format", "chat_template") if card.is_file() else "vicuna_v1"
        )
    return LlavaBackbone.from_pretrained(path, cfg.dtype, cfg.device, prompt_format, cfg.pad_to_square)


def _load_qwen(path: str | Path, cfg: BackboneConfig) -> Backbone:
    return QwenBackbone.from_pretrained(path, cfg.dtype, cfg.device)


@dataclass(frozen=True)
class Family:
    """A model family: ``load(path, cfg)`` gives its adapter; ``vision_flops(config, full_tokens, kept)``
    gives (FLOPs of the vision side, patches, LLM visual tokens before pruning); ``fixed_tokens(config)``
    the LLM visual tokens of every image (None where they depend on the image's size)."""

    label: str
    model_type: str
    config_class: type[PretrainedConfig]
    load: Callable[[str | Path, BackboneConfig], Backbone]
    vision_flops: Callable[[PretrainedConfig, int | None, int], tuple[int, int, int]]
    fixed_tokens: Callable[[PretrainedConfig], int | None]


FAMILIES = (
    Family("LLaVA-1.5", "llava", LlavaConfig, _load_llava, llava_vision_flops, llava_patches),
    Family("Qwen2.5-VL", "qwen2_5_vl", Qwen2_5_VLConfig, _load_qwen, qwen_vision_flops, lambda config: None),
)


def family_of(config: PretrainedConfig) -> Family:
    """The family of a transformers config; BackboneError naming the supported ones otherwise."""
    for family in FAMILIES:
        if isinstance(config, family.config_class):
            return family
    supported = ", ".join(f"{f.label}: {f.model_type!r}" for f in FAMILIES)
    raise BackboneError(f"model type {config.model_type!r} is not supported ({supported})")
