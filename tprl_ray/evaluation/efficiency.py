"""Analytic FLOPs and KV-cache size of one image + prompt through LLaVA-1.5 or Qwen2.5-VL.

Conventions: 2 FLOPs per multiply-accumulate; only matrix products are counted (no norms, softmax,
activations, biases, RoPE); attention counts the full ``n x n`` square, not the causal half, as
FastV and SparseVLM do.

    FLOPs = F_vision + F_pruner + F_prefill + F_decode

LLM decoder layer on ``n`` tokens (``d`` hidden, ``d_q = heads * head_dim``, ``d_kv = kv_heads * head_dim``,
``m`` MLP width, ``V`` vocabulary)::

    F_layer(n) = 2 n (2 d d_q + 2 d d_kv)    q,o and k,v projections
               + 2 * 2 n^2 d_q               scores Q K^T and weighted sum A V
               + 2 * 3 n d m                 gate, up and down (SwiGLU)
    F_prefill  = sum_l F_layer(v_l + t) + 2 d V
                 v_l = layer_tokens[l] if given (FastV) else visual_tokens, t = text_tokens;
                 the LM head runs on the last position only
    F_decode   = sum_{i=1..new_tokens} [sum_l F_step(v_l + t + i) + 2 d V]
    F_step(c)  = 2 (2 d d_q + 2 d d_kv) + 2 * 2 c d_q + 2 * 3 d m    one token attending to c positions, itself included

``new_tokens`` counts decode steps: tokens fed through the LLM after the prompt, each adding one KV entry
(the prefill's LM head already yields the first answer token, so a T-token answer takes T-1 steps).

F_vision runs on every patch, whatever the pruner keeps; the projector / merger runs before pruning in our
pipeline, so on all tokens as well.

LLaVA-1.5 (CLIP ViT: ``P = (image_size / p)^2`` patches + CLS, ``d_v``, ``m_v``)::

    F_vision = 2 P (3 p^2 d_v)                                             patch embedding
             + L_v' [2 (P+1) 4 d_v^2 + 2 * 2 (P+1)^2 d_v + 2 * 2 (P+1) d_v m_v]
             + 2 P' (d_v d + d d)                                          2-layer GELU projector

``L_v'`` is the number of layers up to ``vision_feature_layer``: -2 gives ``L_v - 1``, since the last layer's
output is never used (HF's CLIP runs it anyway, ~4% more vision FLOPs). ``P' = P`` ("default" strategy drops
CLS) or ``P + 1`` ("full").

Qwen2.5-VL (``P = 4 N`` patches for ``N = full_visual_tokens`` LLM tokens, temporal patch ``t_p``)::

    F_vision = 2 P (3 t_p p^2 d_v)                                         patch embedding
             + sum_blocks [2 P 4 d_v^2 + 2 * 2 P a d_v + 2 * 3 P d_v m_v]   a = P in full-attention blocks,
                                                                           a = min(P, w) in windowed ones
             + 2 N (4 d_v 4 d_v + 4 d_v d_out)                             patch merger

``w = (window_size / p)^2`` patches per window (64), counting every window as full.

KV cache = 2 (K and V) * kv_heads * head_dim * bytes_per_value per token per layer, split into the visual
tokens (per layer, so FastV's pruned layers hold fewer), the text prompt and the generated tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from tprl_ray.backbones.families import family_of
from tprl_ray.evaluation.config import SHIPPED, EfficiencyConfig


@dataclass
class Efficiency:
    flops: float
    flops_parts: dict[str, float]  # vision, pruner, prefill, decode
    kv_cache_bytes: float
    kv_parts: dict[str, float]  # visual, text, generated
    tokens: dict  # visual, full_visual, vision_patches, text, new, layer (FastV's per-layer visual tokens or None)

    def to_dict(self) -> dict:
        return asdict(self)


def model_config(name_or_path: str | Path) -> PretrainedConfig:
    """The config of a shipped model (``embedded`` or a paper model) or of a directory holding a config.json."""
    path = SHIPPED.get(str(name_or_path), Path(name_or_path))
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{name_or_path!r}: neither a shipped model ({', '.join(SHIPPED)}) nor a directory with a config.json"
        )
    return AutoConfig.from_pretrained(path)


def decoder_layer_flops(d: int, d_q: int, d_kv: int, m: int, n: int, ctx: int) -> int:
    """``n`` query tokens through one Llama/Qwen2 layer, each attending to ``ctx`` positions."""
    return 2 * n * (2 * d * d_q + 2 * d * d_kv) + 2 * 2 * n * ctx * d_q + 2 * 3 * n * d * m


def efficiency(
    config: PretrainedConfig,
    visual_tokens: int,
    text_tokens: int = 0,
    new_tokens: int = 0,
    pruner_flops: float = 0.0,
    layer_tokens: list[int] | None = None,
    bytes_per_value: int = 2,
    full_visual_tokens: int | None = None,
) -> Efficiency:
    """FLOPs and KV cache of one sample (formulas in the module docstring).

    ``visual_tokens`` enter the LLM (after pruning), ``layer_tokens`` (one count per decoder layer) replaces it
    layer by layer for pruners inside the LLM, ``full_visual_tokens`` are the tokens before pruning (Qwen's
    dynamic resolution; LLaVA's fixed image always gives the config's patch count, the default).
    """
    f_vision, patches, full_visual_tokens = family_of(config).vision_flops(config, full_visual_tokens, visual_tokens)
    text = config.text_config
    layers, d, m, vocab = text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
    d_q, d_kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    visual = [visual_tokens] * layers if layer_tokens is None else list(layer_tokens)
    if len(visual) != layers:
        raise ValueError(f"layer_tokens has {len(visual)} entries, the LLM has {layers} layers")

    lm_head = 2 * d * vocab
    f_prefill = sum(decoder_layer_flops(d, d_q, d_kv, m, v + text_tokens, v + text_tokens) for v in visual) + lm_head
    f_decode = sum(
        sum(decoder_layer_flops(d, d_q, d_kv, m, 1, v + text_tokens + i) for v in visual) + lm_head
        for i in range(1, new_tokens + 1)
    )
    flops_parts = {
        "vision": float(f_vision),
        "pruner": float(pruner_flops),
        "prefill": float(f_prefill),
        "decode": float(f_decode),
    }

    per_token_layer = 2 * d_kv * bytes_per_value  # K and V
    kv_parts = {
        "visual": float(per_token_layer * sum(visual)),
        "text": float(per_token_layer * layers * text_tokens),
        "generated": float(per_token_layer * layers * new_tokens),
    }
    tokens = {
        "visual": visual_tokens,
        "full_visual": full_visual_tokens,
        "vision_patches": patches,
        "text": text_tokens,
        "new": new_tokens,
        "layer": None if layer_tokens is None else visual,
    }
    return Efficiency(sum(flops_parts.values()), flops_parts, sum(kv_parts.values()), kv_parts, tokens)


def pruned_efficiency(
    config: PretrainedConfig,
    pruner,
    full_tokens: int,
    kept: int,
    text_tokens: int,
    new_tokens: int = 1,
    bytes_per_value: int = 2,
) -> Efficiency:
    """:func:`efficiency` of a pruner keeping ``kept`` of ``full_tokens`` visual tokens (its own FLOPs and,
    for in-LLM pruning, its per-layer token counts included)."""
    text, vision = config.text_config, config.vision_config
    layers = text.num_hidden_layers
    per_layer = pruner.layer_tokens(full_tokens, kept, layers)
    return efficiency(
        config,
        kept,
        text_tokens,
        new_tokens,
        pruner_flops=pruner.flops(full_tokens, kept, text.hidden_size, vision.hidden_size, text_tokens),
        layer_tokens=None if per_layer == [kept] * layers else per_layer,
        bytes_per_value=bytes_per_value,
        full_visual_tokens=full_tokens,
    )


def run_efficiency(cfg: EfficiencyConfig) -> dict:
    from tprl_ray.pruners.registry import build_pruner

    config = model_config(cfg.model)
    full = cfg.full_tokens
    if full is None:
        full = family_of(config).vision_flops(config, None, cfg.tokens)[2]
    if cfg.tokens > full:
        raise ValueError(f"--tokens {cfg.tokens} exceeds the {full} visual tokens of the image")
    result = pruned_efficiency(
        config, build_pruner(cfg.pruner), full, cfg.tokens, cfg.text_tokens, cfg.new_tokens, cfg.bytes_per_value
    )
    return {"model": cfg.model, "pruner": cfg.pruner, **result.to_dict()}


def command(cfg: EfficiencyConfig) -> None:
    """`tprl efficiency`."""
    print(json.dumps(run_efficiency(cfg), indent=2))
