"""Pruning inside the LLM at layer K during prefill (FastV, ECCV 2024), with a consistent KV cache.

The decoder layers are driven one by one. Layers ``< K`` see every token. After layer ``K-1`` the
attention of the last prompt token to the visual tokens at that layer (head-averaged, computed
explicitly from the cached keys, so SDPA needs no attention weights) ranks them; layers ``>= K``
see only the top ``n_keep`` (kept in raster order, with their original position ids: 1-D for
LLaVA, 3-D M-RoPE for Qwen2.5-VL). Each layer's cache holds exactly the tokens that layer saw, and
decoding uses one mask per layer to match. Works on any ``Backbone`` whose decoder layers take
``(hidden, attention_mask, position_embeddings, cache)`` (Llama and Qwen2 layers do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tprl_ray.backbones.base import Backbone, BackboneError


def _additive_mask(valid: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, queries, K]`` mask: valid keys at or before each query (the last ``queries`` keys)."""
    keys = valid.shape[1]
    q_index = torch.arange(keys - queries, keys, device=valid.device)[:, None]
    k_index = torch.arange(keys, device=valid.device)[None, :]
    allowed = (valid[:, None, :] & (k_index <= q_index)[None]) | (k_index == q_index)[None]
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def _last_token_attention(
    layer, hidden_in: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Head-averaged attention of the last position to every key at ``layer``, ``[B, T]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in[:, -1:])
    q = attn.q_proj(x).view(x.shape[0], 1, -1, attn.head_dim).transpose(1, 2)
    cos, sin = cos_sin
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # grouped-query attention
    scores = (q @ keys.transpose(-1, -2))[:, :, 0] * attn.scaling
    scores = scores.masked_fill(~valid[:, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).mean(dim=1)


@dataclass
class FastVState:
    """What decoding after a FastV prefill needs: key validity of layers ``< k`` (every token) and
    ``>= k`` (kept tokens), the next position id and the per-layer cache."""

    valid_full: torch.Tensor
    valid_kept: torch.Tensor
    next_position: torch.Tensor
    cache: DynamicCache
    k: int


@torch.no_grad()
def fastv_prefill(
    backbone: Backbone,
    questions: list[str],
    features,
    k: int,
    n_keep: int,
    grids: list[tuple[int, int]] | None = None,
    extra_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FastVState, torch.Tensor]:
    """Prefill with FastV at layer ``k``; returns (last-position logits, state, kept visual indices).

    ``extra_ids`` (``[B, M]``) appends already generated tokens after the prompt; the ranking still
    uses the last *prompt* token, so this is the no-cache reference for decoding. Every image of a
    batch must have the same token count (group dynamic-resolution images by size).
    """
    lm = backbone.language_model
    layers = lm.layers
    if not 1 <= k < len(layers):
        raise BackboneError(f"FastV layer K={k} must be in [1, {len(layers) - 1}]")
    if len({f.shape[0] for f in features}) != 1:
        raise BackboneError("FastV batches need the same visual token count for every image")
    batch = backbone.build_inputs(questions, features, None, grids=grids)
    hidden, valid, positions = batch.inputs_embeds, batch.attention_mask.bool(), batch.position_ids
    visual = batch.visual_mask
    prompt_len = hidden.shape[1]
    if extra_ids is not None:
        hidden = torch.cat([hidden, lm.embed_tokens(extra_ids)], dim=1)
        valid = torch.cat([valid, torch.ones_like(extra_ids, dtype=torch.bool)], dim=1)
        extra = torch.arange(1, extra_ids.shape[1] + 1, device=positions.device)
        positions = torch.cat([positions, positions[..., -1:] + extra], dim=-1)
        visual = torch.cat([visual, torch.zeros_like(extra_ids, dtype=torch.bool)], dim=1)
    cache = DynamicCache(config=lm.config)
    cos_sin = lm.rotary_emb(hidden, position_ids=positions)
    mask = _additive_mask(valid, hidden.shape[1], hidden.dtype)
    for i in range(k):
        hidden_in = hidden
        hidden = layers[i](hidden, attention_mask=mask, position_embeddings=cos_sin, cache=cache, use_cache=True)
    prompt_cos_sin = (cos_sin[0][:, :prompt_len], cos_sin[1][:, :prompt_len])
    keys = cache.layers[k - 1].keys[:, :, :prompt_len]
    scores = _last_token_attention(
        layers[k - 1], hidden_in[:, :prompt_len], keys, valid[:, :prompt_len], prompt_cos_sin
    )
    n_visual = int(visual[0].sum())
    scores = scores.masked_fill(~visual[:, :prompt_len], -1.0)
    top = scores.topk(min(n_keep, n_visual), dim=-1).indices
    drop = visual.clone()
    drop.scatter_(1, top, False)
    kept_positions = (~drop).nonzero()[:, 1].view(hidden.shape[0], -1)  # same count in every row
    gather = kept_positions[..., None]
    hidden = hidden.gather(1, gather.expand(-1, -1, hidden.shape[-1]))
    valid_kept = valid.gather(1, kept_positions)
    positions_kept = positions.gather(-1, kept_positions.expand(*positions.shape[:-1], -1))
    cos_sin = lm.rotary_emb(hidden, position_ids=positions_kept)
    mask = _additive_mask(valid_kept, hidden.shape[1], hidden.dtype)
    for i in range(k, len(layers)):
        hidden = layers[i](hidden, attention_mask=mask, position_embeddings=cos_sin, cache=cache, use_cache=True)
    logits = backbone.model.lm_head(lm.norm(hidden[:, -1:]))[:, 0]
    first_visual = visual[:, :prompt_len].float().argmax(dim=1, keepdim=True)
    kept_visual = torch.sort(top, dim=-1).values - first_visual
    state = FastVState(valid, valid_kept, positions[..., -1:] + 1, cache, k)
    return logits, state, kept_visual


@torch.no_grad()
def fastv_step(backbone: Backbone, state: FastVState, token: torch.Tensor) -> torch.Tensor:
    """Decode one token per sample with the per-layer caches of a FastV prefill; returns logits."""
    lm = backbone.language_model
    hidden = lm.embed_tokens(token[:, None])
    ones = torch.ones_like(token[:, None], dtype=torch.bool)
    state.valid_full = torch.cat([state.valid_full, ones], dim=1)
    state.valid_kept = torch.cat([state.valid_kept, ones], dim=1)
    cos_sin = lm.rotary_emb(hidden, position_ids=state.next_position)
    masks = [_additive_mask(state.valid_full, 1, hidden.dtype), _additive_mask(state.valid_kept, 1, hidden.dtype)]
    for i, layer in enumerate(lm.layers):
        hidden = layer(
            hidden, attention_mask=masks[i >= state.k], position_embeddings=cos_sin, cache=state.cache, use_cache=True
        )
    state.next_position = state.next_position + 1
    return backbone.model.lm_head(lm.norm(hidden))[:, 0]


@torch.no_grad()
def fastv_generate(
    backbone: Backbone,
    questions: list[str],
    features,
    k: int,
    n_keep: int,
    grids: list[tuple[int, int]] | None = None,
    max_new_tokens: int = 8,
) -> tuple[list[str], torch.Tensor]:
    """Greedy decoding with FastV pruning at layer ``k``; returns texts and kept visual indices."""
    logits, state, kept = fastv_prefill(backbone, questions, features, k, n_keep, grids)
    texts = backbone.greedy_decode(logits, lambda token: fastv_step(backbone, state, token), max_new_tokens)
    return texts, kept
