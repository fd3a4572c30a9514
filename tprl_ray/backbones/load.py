"""Load a backbone: the backend named by ``BackboneConfig.backend``, the adapter of the checkpoint's family."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tprl_ray.backbones.backend import Backend
from tprl_ray.backbones.base import BackboneError, check_adapter, checkpoint_config
from tprl_ray.backbones.families import family_of
from tprl_ray.config import BackboneConfig


def resolve_device(device: str) -> str:
    """``device`` with 'auto' replaced by 'cuda' when a GPU is visible, else 'cpu'."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_hf(cfg: BackboneConfig) -> Backend:
    """The transformers adapter for the checkpoint's family, loaded with ``from_pretrained``."""
    path = cfg.resolved_path()
    try:
        family = family_of(checkpoint_config(path))
    except BackboneError as exc:
        raise BackboneError(f"{path}: {exc}") from None
    backbone = family.load(path, cfg.model_copy(update={"device": resolve_device(cfg.device)}))
    if cfg.adapter is not None:
        backbone.model = merge_adapter(backbone.model, cfg.adapter)
    return backbone


def merge_adapter(model, adapter: Path):
    """``model`` with the peft LoRA adapter in ``adapter`` merged into its weights."""
    from peft import PeftModel

    check_adapter(adapter)
    try:
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise BackboneError(f"{adapter}: the adapter does not fit this model ({str(exc).splitlines()[0]})") from None


def load_vllm(cfg: BackboneConfig) -> Backend:
    """LLaVA's language model in a vLLM engine (:mod:`tprl_ray.backbones.vllm`; vLLM imported there)."""
    from tprl_ray.backbones.vllm import load_vllm

    return load_vllm(cfg)


BACKENDS: dict[str, Callable[[BackboneConfig], Backend]] = {"hf": load_hf, "vllm": load_vllm}


def load_backbone(cfg: BackboneConfig | str | Path) -> Backend:
    """The model ``cfg`` describes (a path alone: the ``hf`` backend with default settings)."""
    cfg = cfg if isinstance(cfg, BackboneConfig) else BackboneConfig(path=str(cfg))
    return BACKENDS[cfg.backend](cfg)
