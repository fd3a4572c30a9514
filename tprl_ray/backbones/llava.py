"""LLaVA-1.5 adapter: visual tokens, pruned scoring and pruned greedy generation.

Pruning happens at the LLM input. A prompt is tokenised once with a single ``<image>`` token; the
LLM input for one sample is ``[embed(text before <image>), kept visual tokens, embed(text after)]``
with the kept tokens in raster order (sorted original indices). Samples of a batch are left-padded
and positions are recompacted (``0..L-1`` over the real tokens), as LLaVA's pruning papers do. With
every token kept this is exactly the stock ``model(input_ids, pixel_values)`` forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration


class BackboneError(ValueError):
    """A checkpoint or input the backbone cannot use; the message says what and where."""


@dataclass
class VisualTokens:
    """What a backbone's vision side yields for a batch of images (``N`` tokens each).

    ``llm_tokens`` go to the LLM (post-projector, ``[B, N, d_llm]``); ``features`` are the
    pre-projector vision features of the feature layer that the pruning policy sees (``[B, N, d_v]``);
    ``attention`` is the head-averaged attention from [CLS] to each patch at that layer (``[B, N]``,
    only when asked for); ``positions`` are the tokens' raster indices (``[N]``).
    """

    llm_tokens: torch.Tensor
    features: torch.Tensor
    attention: torch.Tensor | None
    positions: torch.Tensor


@dataclass
class LlmBatch:
    """Left-padded LLM inputs for a batch; ``targets[i]`` lists (position, token id) to score and
    ``visual_mask`` marks the positions that hold visual tokens."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: list[list[tuple[int, int]]]
    visual_mask: torch.Tensor


class LlavaBackbone:
    """A ``LlavaForConditionalGeneration`` and its processor, driven with kept-token indices."""

    def __init__(self, model: LlavaForConditionalGeneration, processor, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        self.image_token_id = model.config.image_token_id
        self._prompt_ids = lru_cache(maxsize=65536)(self._tokenize_prompt)
        self.answer_ids = lru_cache(maxsize=65536)(self._answer_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu") -> "LlavaBackbone":
        """Load a LLaVA checkpoint (local directory or hub id) with its processor."""
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise BackboneError(f"{path}: not a loadable model checkpoint ({exc})") from None
        if not isinstance(config, LlavaConfig):
            raise BackboneError(f"{path}: model type {config.model_type!r} is not a LLaVA checkpoint")
        try:
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
        except OSError as exc:
            raise BackboneError(f"{path}: no loadable weights ({exc})") from None
        except (RuntimeError, ValueError) as exc:
            raise BackboneError(
                f"{path}: weights do not match config.json (vision hidden_size "
                f"{config.vision_config.hidden_size}, text hidden_size {config.text_config.hidden_size}): "
                f"{str(exc).splitlines()[0]}") from None
        return cls(model, AutoProcessor.from_pretrained(path), device)

    # ---- prompts -------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _tokenize_prompt(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ids = self.tokenizer(self.prompt(question), add_special_tokens=True)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise BackboneError(f"prompt for {question!r} must hold exactly one image token")
        cut = ids.index(self.image_token_id)
        return tuple(ids[:cut]), tuple(ids[cut + 1:])

    def _answer_ids(self, question: str, answer: str) -> tuple[int, ...]:
        """Token ids of ``answer`` as the assistant's reply to ``question``, then end-of-sequence."""
        prompt = self.prompt(question)
        full = self.tokenizer(f"{prompt} {answer}", add_special_tokens=True)["input_ids"]
        head = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if full[: len(head)] != head or len(full) == len(head):
            raise BackboneError(f"answer {answer!r} does not tokenise as a continuation of the prompt")
        return tuple(full[len(head):]) + (self.tokenizer.eos_token_id,)

    # ---- vision --------------------------------------------------------------------------
    def pixel_values(self, images) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """LLM-ready visual tokens (post-projector), ``[B, N, d_llm]``."""
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype))
        return torch.stack(list(out.pooler_output))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, with_attention: bool = False) -> VisualTokens:
        """One vision pass: LLM tokens, pre-projector features and, if asked, [CLS] attention.

        Attention weights need eager attention; the vision tower switches to it for this call only
        (SDPA returns no weights), and the language model is never touched.
        """
        config = self.model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise BackboneError("encode supports vision_feature_select_strategy='default' with one feature layer")
        tower_impl = config.vision_config._attn_implementation
        if with_attention:
            self.model.set_attn_implementation({"vision_config": "eager"})
        try:
            out = self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype),
                                                output_hidden_states=True, output_attentions=with_attention)
        finally:
            if with_attention:
                self.model.set_attn_implementation({"vision_config": tower_impl})
        layer = config.vision_feature_layer
        features = out.hidden_states[layer][:, 1:]
        attention = None
        if with_attention:
            # hidden_states[i + 1] is the output of layer i, so hidden_states[layer] comes from attentions[layer]
            attention = out.attentions[layer if layer < 0 else layer - 1][:, :, 0, 1:].mean(dim=1)
        n = features.shape[1]
        return VisualTokens(torch.stack(list(out.pooler_output)), features, attention,
                            torch.arange(n, device=features.device))

    def query_embedding(self, question: str) -> torch.Tensor:
        """The MDP's query vector ``q``: the mean LLM input embedding over the question's own tokens
        (no chat template, no special tokens), ``[d_llm]``."""
        ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BackboneError(f"question {question!r} has no tokens")
        with torch.no_grad():
            return self.model.get_input_embeddings()(torch.tensor(ids, device=self.device)).mean(dim=0)

    # ---- LLM inputs ----------------------------------------------------------------------
    def build_inputs(self, questions: list[str], features: torch.Tensor, keep: list[torch.Tensor] | None,
                     answers: list[str] | None = None) -> LlmBatch:
        """Splice kept visual tokens into each prompt (and teacher-forced answer); left-pad."""
        rows = []
        for i, question in enumerate(questions):
            before, after = self._prompt_ids(question)
            visual = features[i] if keep is None else features[i, torch.sort(keep[i]).values]
            answer = self.answer_ids(question, answers[i]) if answers is not None else []
            # the last prompt token predicts answer[0], each answer token the next, the last one EOS
            first = len(after) - 1
            rows.append((list(before), visual, list(after) + list(answer[:-1]),
                         [(first + j, tok) for j, tok in enumerate(answer)]))
        return self.pack(rows)

    def pack(self, rows: list[tuple[list[int], torch.Tensor, list[int], list[tuple[int, int]]]]) -> LlmBatch:
        """Left-padded LLM inputs from ``(ids before image, visual tokens, ids after, targets)`` rows.

        Target positions count from the first id after the visual tokens; they come back absolute.
        One embedding call for all text ids, one scatter for all visual tokens.
        """
        lengths = [len(before) + visual.shape[0] + len(after) for before, visual, after, _ in rows]
        if any(visual.shape[0] == 0 for _, visual, _, _ in rows):
            raise BackboneError("at least one visual token must be kept")
        width, pad_id = max(lengths), self.tokenizer.pad_token_id or 0
        ids, is_visual, targets = [], [], []
        for (before, visual, after, tgt), length in zip(rows, lengths):
            pad, k = width - length, visual.shape[0]
            ids.append([pad_id] * (pad + len(before) + k) + list(after))
            ids[-1][pad:pad + len(before)] = before
            is_visual.append([False] * (pad + len(before)) + [True] * k + [False] * len(after))
            targets.append([(pad + len(before) + k + p, t) for p, t in tgt])
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        visual_mask = torch.tensor(is_visual, device=self.device)
        embeds = self.model.get_input_embeddings()(ids_t)
        embeds[visual_mask] = torch.cat([visual for _, visual, _, _ in rows]).to(embeds.dtype)
        mask = (torch.arange(width, device=self.device)[None, :]
                >= torch.tensor([width - n for n in lengths], device=self.device)[:, None]).long()
        embeds = embeds * mask[..., None]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return LlmBatch(embeds, mask, position_ids, targets, visual_mask)

    def logits(self, batch: LlmBatch, **kwargs):
        return self.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, **kwargs)

    @torch.no_grad()
    def score(self, questions: list[str], answers: list[str], features: torch.Tensor,
              keep: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: mean log-likelihood of the answer tokens, and whether greedy decoding
        reproduces the answer (every answer token and the end-of-sequence are the argmax)."""
        batch = self.build_inputs(questions, features, keep, answers)
        # left padding puts every answer at the end of its row: project only those positions
        width = batch.inputs_embeds.shape[1]
        tail = width - min(p for tgt in batch.targets for p, _ in tgt)
        logp = torch.log_softmax(self.logits(batch, logits_to_keep=tail).logits.float(), dim=-1)
        row = torch.tensor([i for i, tgt in enumerate(batch.targets) for _ in tgt], device=self.device)
        pos = torch.tensor([p - (width - tail) for tgt in batch.targets for p, _ in tgt], device=self.device)
        tok = torch.tensor([t for tgt in batch.targets for _, t in tgt], device=self.device)
        is_answer = torch.tensor([j < len(tgt) - 1 for tgt in batch.targets for j in range(len(tgt))],
                                 device=self.device)  # every target but the final end-of-sequence
        picked = logp[row, pos]
        n = len(batch.targets)
        token_logp = picked.gather(1, tok[:, None])[:, 0] * is_answer
        mean_logp = torch.zeros(n, device=self.device).index_add_(0, row, token_logp) / \
            torch.zeros(n, device=self.device).index_add_(0, row, is_answer.float())
        wrong = torch.zeros(n, device=self.device).index_add_(0, row, (picked.argmax(-1) != tok).float())
        return mean_logp.cpu(), (wrong == 0).cpu()

    @torch.no_grad()
    def generate(self, questions: list[str], features: torch.Tensor, keep: list[torch.Tensor] | None = None,
                 max_new_tokens: int = 8) -> list[str]:
        """Greedy decoding with a KV cache, stopping each sample at end-of-sequence."""
        batch = self.build_inputs(questions, features, keep)
        out = self.logits(batch, use_cache=True, logits_to_keep=1)
        state = {"mask": batch.attention_mask, "pos": batch.position_ids[:, -1:], "cache": out.cache}

        def step(token: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            state["pos"] = state["pos"] + 1
            nxt = self.model(inputs_embeds=self.model.get_input_embeddings()(token[:, None]),
                             attention_mask=state["mask"], position_ids=state["pos"],
                             cache=state["cache"], use_cache=True)
            state["cache"] = nxt.cache
            return nxt.logits[:, -1]

        return self.greedy_decode(out.logits[:, -1], step, max_new_tokens)

    @torch.no_grad()
    def greedy_decode(self, logits: torch.Tensor, step, max_new_tokens: int) -> list[str]:
        """Greedy tokens from first-token ``logits`` ``[B, V]``; ``step(tokens)`` returns the next logits.
        Finished samples keep emitting end-of-sequence; decoding stops when all are finished."""
        eos = self.tokenizer.eos_token_id
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens = []
        for i in range(max_new_tokens):
            nxt = torch.where(done, torch.full_like(done, eos, dtype=torch.long), logits.argmax(-1))
            tokens.append(nxt)
            done |= nxt == eos
            if done.all() or i == max_new_tokens - 1:
                break
            logits = step(nxt)
        seqs = torch.stack(tokens, dim=1).tolist()
        return [self.tokenizer.decode(s[: s.index(eos)] if eos in s else s, skip_special_tokens=True).strip()
                for s in seqs]
