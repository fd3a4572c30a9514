"""Pick and load the adapter for a checkpoint: LLaVA-1.5 or Qwen2.5-VL, by its ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoConfig, LlavaConfig, Qwen2_5_VLConfig

from tprl_ray.backbones.base import Backbone, BackboneError
from tprl_ray.backbones.llava import LlavaBackbone
from tprl_ray.backbones.qwen import QwenBackbone

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODEL = ASSETS / "tiny-llava-digits"
Dtype = Literal["float32", "bfloat16", "float16"]
PAPER_CONFIGS = {name: ASSETS / "configs" / name for name in ("llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-3b")}


class BackboneConfig(BaseModel):
    """Which vision-language model to load, and how."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field("embedded", description="'embedded' (the shipped tiny LLaVA), a local directory or a hub id")
    dtype: Dtype = "float32"
    device: str = Field("auto", description="torch device: 'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    prompt_format: Literal["auto", "vicuna_v1", "chat_template"] = Field(
        "auto", description="LLaVA prompts: 'auto' is the model card's format for tprl-trained models, else vicuna_v1")
    pad_to_square: bool = Field(True, description="LLaVA: pad images to a square with the mean colour first")


def resolve_path(path: str | Path) -> str | Path:
    return EMBEDDED_MODEL if str(path) == "embedded" else path


def resolve_device(device: str) -> str:
    """``device`` with 'auto' replaced by 'cuda' when a GPU is visible, else 'cpu'."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_backbone(cfg: BackboneConfig | str | Path) -> Backbone:
    """The adapter for ``cfg.path``'s model type, loaded with ``from_pretrained``."""
    cfg = cfg if isinstance(cfg, BackboneConfig) else BackboneConfig(path=str(cfg))
    path = resolve_path(cfg.path)
    cfg = cfg.model_copy(update={"device": resolve_device(cfg.device)})
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path}: not a loadable model checkpoint ({exc})") from None
    if isinstance(config, Qwen2_5_VLConfig):
        return QwenBackbone.from_pretrained(path, cfg.dtype, cfg.device)
    if not isinstance(config, LlavaConfig):
        raise BackboneError(f"{path}: model type {config.model_type!r} is not supported "
                            f"(LLaVA-1.5: 'llava', Qwen2.5-VL: 'qwen2_5_vl')")
    prompt_format = cfg.prompt_format
    if prompt_format == "auto":
        card = Path(path) / "tprl_model_card.json"
        prompt_format = json.loads(card.read_text()).get("prompt_format", "chat_template") \
            if card.is_file() else "vicuna_v1"
    return LlavaBackbone.from_pretrained(path, cfg.dtype, cfg.device, prompt_format, cfg.pad_to_square)
