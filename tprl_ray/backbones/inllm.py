"""Pruning inside the LLM during prefill, in stages, with a consistent KV cache (FastV, SparseVLM).

The decoder layers are driven one by one. A schedule of stages ``(after_layer, keep)`` says after
which layers the visual tokens are thinned to ``keep``; a ranking function scores them there from
that layer's attention (head-averaged, computed explicitly from the cached keys, so SDPA needs no
attention weights). Kept tokens stay in raster order with their original position ids (1-D for
LLaVA, 3-D M-RoPE for Qwen2.5-VL). Each layer's cache holds exactly the tokens that layer saw, and
decoding uses one mask per layer to match. Works on any ``Backbone`` whose decoder layers take
``(hidden, attention_mask, position_embeddings, cache)`` (Llama and Qwen2 layers do).

- FastV ("An Image is Worth 1/2 Tokens After Layer 2", Chen et al., ECCV 2024): one stage after
  layer ``K-1``, ranked by the attention of the last prompt token.
- SparseVLM ("SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
  Inference", Zhang et al., ICML 2025): text raters (the text tokens after the image whose softmax
  relevance to the visual tokens at the LLM input is above the mean) rank the visual tokens by
  their mean attention at each stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tprl_ray.backbones.base import Backbone, BackboneError


@dataclass(frozen=True)
class Stage:
    """After decoder layer ``after_layer`` (0-based), keep ``keep`` visual tokens."""

    after_layer: int
    keep: int


@dataclass
class Sequence:
    """The prefill's rows as they shrink: hidden states, key validity, position ids, which positions
    are visual, prompt (not appended) and raters, and each position's index in the full sequence."""

    hidden: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    visual: torch.Tensor
    prompt: torch.Tensor
    raters: torch.Tensor
    origin: torch.Tensor

    def keep(self, index: torch.Tensor) -> Sequence:
        """The rows at ``index`` (``[B, L']``, sorted, the same count per row)."""
        take = lambda t: t.gather(1, index)  # noqa: E731
        return Sequence(
            self.hidden.gather(1, index[..., None].expand(-1, -1, self.hidden.shape[-1])),
            take(self.valid),
            self.positions.gather(-1, index.expand(*self.positions.shape[:-1], -1)),
            take(self.visual),
            take(self.prompt),
            take(self.raters),
            take(self.origin),
        )


# A ranking: (layer, its input hidden states, its cached keys, key validity, raters, cos/sin), all over the
# prompt's positions -> a score per position, [B, L]
Ranking = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple], torch.Tensor]


def additive_mask(valid: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, queries, K]`` mask: valid keys at or before each query (the last ``queries`` keys)."""
    keys = valid.shape[1]
    q_index = torch.arange(keys - queries, keys, device=valid.device)[:, None]
    k_index = torch.arange(keys, device=valid.device)[None, :]
    allowed = (valid[:, None, :] & (k_index <= q_index)[None]) | (k_index == q_index)[None]
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def attention_from(
    layer, hidden_in: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, cos_sin: tuple, queries: torch.Tensor
) -> torch.Tensor:
    """Head-averaged causal attention of the positions ``queries`` (``[Q]``) to every key at ``layer``,
    ``[B, Q, T]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in[:, queries])
    q = attn.q_proj(x).view(x.shape[0], queries.numel(), -1, attn.head_dim).transpose(1, 2)
    cos, sin = cos_sin
    q, _ = apply_rotary_pos_emb(q, q, cos[:, queries], sin[:, queries])
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # grouped-query attention
    scores = (q @ keys.transpose(-1, -2)) * attn.scaling
    causal = torch.arange(keys.shape[2], device=keys.device)[None, :] <= queries[:, None]
    scores = scores.masked_fill(~(valid[:, None, None, :] & causal[None, None]), torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).mean(dim=1)


def last_token_ranking(layer, hidden_in, keys, valid, raters, cos_sin) -> torch.Tensor:
    """FastV: the last prompt token's attention."""
    last = torch.tensor([hidden_in.shape[1] - 1], device=keys.device)
    return attention_from(layer, hidden_in, keys, valid, cos_sin, last)[:, 0]


def rater_ranking(layer, hidden_in, keys, valid, raters, cos_sin) -> torch.Tensor:
    """SparseVLM: the raters' mean attention."""
    first = int(raters.float().argmax(dim=1).min())
    queries = torch.arange(first, hidden_in.shape[1], device=keys.device)
    weights = raters[:, queries].float()  # [B, Q]
    attention = attention_from(layer, hidden_in, keys, valid, cos_sin, queries)
    return (weights[..., None] * attention).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


def select_raters(embeds: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` mask of SparseVLM's raters: of the text tokens after the image, those whose relevance
    (softmax over the text tokens of each visual token's dot products, averaged over the visual
    tokens) is above the mean relevance."""
    raters = torch.zeros_like(visual)
    for i in range(embeds.shape[0]):
        where = visual[i].nonzero()[:, 0]
        after = torch.arange(int(where[-1]) + 1, embeds.shape[1], device=embeds.device)
        after = after[valid[i, after]]
        relevance = torch.softmax(embeds[i, where].float() @ embeds[i, after].float().T, dim=-1).mean(dim=0)
        raters[i, after[relevance > relevance.mean()]] = True
    return raters


@dataclass
class PrunedCache:
    """What decoding after a staged prefill needs: each layer's key validity, the next position id and
    the per-layer cache."""

    valid: list[torch.Tensor]
    next_position: torch.Tensor
    cache: DynamicCache


@torch.no_grad()
def staged_prefill(
    backbone: Backbone,
    questions: list[str],
    features,
    stages: list[Stage],
    ranking: Ranking,
    grids: list[tuple[int, int]] | None = None,
    extra_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PrunedCache, torch.Tensor]:
    """Prefill with the visual tokens thinned at each stage; returns (last-position logits, cache,
    kept visual indices after the last stage).

    ``extra_ids`` (``[B, M]``) appends already generated tokens after the prompt; rankings still use
    the prompt only, so this is the no-cache reference for decoding. Every image of a batch must have
    the same token count (group dynamic-resolution images by size).
    """
    lm = backbone.language_model
    layers = lm.layers
    if len({f.shape[0] for f in features}) != 1:
        raise BackboneError("in-LLM pruning needs the same visual token count for every image of a batch")
    if any(not 0 <= s.after_layer < len(layers) - 1 for s in stages):
        raise BackboneError(f"pruning stages must follow layers 0..{len(layers) - 2}: {stages}")
    batch = backbone.build_inputs(questions, features, None, grids=grids)
    valid, width = batch.attention_mask.bool(), batch.inputs_embeds.shape[1]
    seq = Sequence(
        batch.inputs_embeds, valid, batch.position_ids, batch.visual_mask, torch.ones_like(valid),
        select_raters(batch.inputs_embeds, batch.visual_mask, valid) if ranking is rater_ranking else valid & False,
        torch.arange(width, device=valid.device).expand(valid.shape[0], -1),
    )  # fmt: skip
    if extra_ids is not None:
        extra = torch.arange(1, extra_ids.shape[1] + 1, device=valid.device)
        appended = torch.zeros_like(extra_ids, dtype=torch.bool)
        seq = Sequence(
            torch.cat([seq.hidden, lm.embed_tokens(extra_ids)], dim=1), torch.cat([seq.valid, ~appended], dim=1),
            torch.cat([seq.positions, seq.positions[..., -1:] + extra], dim=-1), torch.cat([seq.visual, appended], 1),
            torch.cat([seq.prompt, appended], 1), torch.cat([seq.raters, appended], 1),
            torch.cat([seq.origin, width - 1 + extra.expand(valid.shape[0], -1)], 1),
        )  # fmt: skip
    first_visual = batch.visual_mask.float().argmax(dim=1, keepdim=True)
    cache, valids = DynamicCache(config=lm.config), []
    by_layer = {s.after_layer: s.keep for s in stages}
    cos_sin = lm.rotary_emb(seq.hidden, position_ids=seq.positions)
    mask = additive_mask(seq.valid, seq.hidden.shape[1], seq.hidden.dtype)
    for i, layer in enumerate(layers):
        hidden_in = seq.hidden
        seq.hidden = layer(seq.hidden, attention_mask=mask, position_embeddings=cos_sin, cache=cache, use_cache=True)
        valids.append(seq.valid)
        if i not in by_layer:
            continue
        prompt = int(seq.prompt[0].sum())
        keys = cache.layers[i].keys[:, :, :prompt]
        scores = ranking(
            layer, hidden_in[:, :prompt], keys, seq.valid[:, :prompt], seq.raters[:, :prompt],
            (cos_sin[0][:, :prompt], cos_sin[1][:, :prompt]),
        )  # fmt: skip
        visual = seq.visual[:, :prompt]
        scores = scores.masked_fill(~visual, -1.0)
        top = scores.topk(min(by_layer[i], int(visual[0].sum())), dim=-1).indices
        drop = seq.visual.clone()
        drop.scatter_(1, top, False)
        seq = seq.keep((~drop).nonzero()[:, 1].view(seq.hidden.shape[0], -1))  # same count in every row
        cos_sin = lm.rotary_emb(seq.hidden, position_ids=seq.positions)
        mask = additive_mask(seq.valid, seq.hidden.shape[1], seq.hidden.dtype)
    logits = backbone.model.lm_head(lm.norm(seq.hidden[:, -1:]))[:, 0]
    kept_visual = seq.origin[seq.visual].view(seq.hidden.shape[0], -1) - first_visual
    next_position = batch.position_ids[..., -1:] + 1 + (0 if extra_ids is None else extra_ids.shape[1])
    return logits, PrunedCache(valids, next_position, cache), kept_visual


@torch.no_grad()
def pruned_step(backbone: Backbone, state: PrunedCache, token: torch.Tensor) -> torch.Tensor:
    """Decode one token per sample with the per-layer caches of a staged prefill; returns logits."""
    lm = backbone.language_model
    hidden = lm.embed_tokens(token[:, None])
    ones = torch.ones_like(token[:, None], dtype=torch.bool)
    state.valid = [torch.cat([v, ones], dim=1) for v in state.valid]
    cos_sin = lm.rotary_emb(hidden, position_ids=state.next_position)
    for layer, valid in zip(lm.layers, state.valid):
        mask = additive_mask(valid, 1, hidden.dtype)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, cache=state.cache, use_cache=True)
    state.next_position = state.next_position + 1
    return backbone.model.lm_head(lm.norm(hidden))[:, 0]


@torch.no_grad()
def staged_generate(
    backbone: Backbone,
    questions: list[str],
    features,
    stages: list[Stage],
    ranking: Ranking,
    grids: list[tuple[int, int]] | None = None,
    max_new_tokens: int = 8,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding with staged in-LLM pruning; returns token ids and kept visual indices."""
    logits, state, kept = staged_prefill(backbone, questions, features, stages, ranking, grids)
    ids = backbone.greedy_ids(logits, lambda token: pruned_step(backbone, state, token), max_new_tokens)
    return ids, kept


def fastv_stages(layers: int, k: int, n_keep: int) -> list[Stage]:
    """FastV's one stage in an LLM of ``layers`` decoder layers: after layer ``k - 1`` keep ``n_keep``."""
    if not 1 <= k < layers:
        raise BackboneError(f"FastV layer K={k} must be in [1, {layers - 1}]")
    return [Stage(k - 1, n_keep)]


def fastv_prefill(backbone, questions, features, k: int, n_keep: int, grids=None, extra_ids=None):
    """:func:`staged_prefill` with FastV at layer ``k``."""
    stages = fastv_stages(backbone.language_model.config.num_hidden_layers, k, n_keep)
    return staged_prefill(backbone, questions, features, stages, last_token_ranking, grids, extra_ids)


def fastv_generate(backbone, questions, features, k: int, n_keep: int, grids=None, max_new_tokens: int = 8):
    """Greedy decoding with FastV pruning at layer ``k``; returns texts and kept visual indices."""
    stages = fastv_stages(backbone.language_model.config.num_hidden_layers, k, n_keep)
    ids, kept = staged_generate(backbone, questions, features, stages, last_token_ranking, grids, max_new_tokens)
    return backbone.decode(ids), kept
