"""What every backbone adapter shares: prompts split at the image, pruned LLM inputs, scoring, decoding.

Pruning happens at the LLM input. A prompt is tokenised once with a single image placeholder; the
LLM input of one sample is ``[embed(text before image), kept visual tokens, embed(text after)]``
with the kept tokens in raster order (sorted original indices). Samples of a batch are left-padded.
With every token kept this is exactly the stock ``model(input_ids, pixel_values, ...)`` forward.
Position ids are the adapter's business: LLaVA recompacts them, Qwen2.5-VL keeps each kept
token's original 3-D M-RoPE position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig


class BackboneError(ValueError):
    """A checkpoint or input the backbone cannot use; the message says what and where."""


def checkpoint_config(path):
    """The transformers config of the checkpoint at ``path``; a ``BackboneError`` naming it otherwise."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path}: not a loadable model checkpoint ({exc})") from None


def check_adapter(adapter) -> None:
    """A ``BackboneError`` unless ``adapter`` is a peft adapter directory."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise BackboneError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json; tprl train llm --out)")


def load_model(model_class, config_class, family: str, path, dtype: str):
    """``model_class.from_pretrained(path)`` after checking that ``path`` holds a ``config_class``
    checkpoint; every failure becomes one ``BackboneError`` line naming the path."""
    config = checkpoint_config(path)
    if not isinstance(config, config_class):
        raise BackboneError(f"{path}: model type {config.model_type!r} is not a {family} checkpoint")
    try:
        return model_class.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as exc:
        raise BackboneError(f"{path}: no loadable weights ({exc})") from None
    except (RuntimeError, ValueError) as exc:
        raise BackboneError(
            f"{path}: weights do not match config.json (vision hidden_size {config.vision_config.hidden_size}, "
            f"text hidden_size {config.text_config.hidden_size}): {str(exc).splitlines()[0]}"
        ) from None


Grid = tuple[int, int]


def project_rows(backend, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sample's LLM-ready tokens from its stored features (``[N_i, d_v]``): one projector call for all."""
    return list(backend.project(torch.cat(features)).split([len(f) for f in features]))


def all_argmax(logits: torch.Tensor, row: torch.Tensor, tok: torch.Tensor, n: int) -> torch.Tensor:
    """Per sample of ``n``: whether each of its targets (``row``, token ``tok``) is the argmax of ``logits``
    (greedy decoding reproduces the answer)."""
    wrong = torch.zeros(n, device=logits.device).index_add_(0, row, (logits.argmax(-1) != tok).float())
    return wrong == 0


@dataclass
class VisualTokens:
    """What a backbone's vision side yields for a batch of images.

    Per image ``i`` with ``N_i`` LLM visual tokens laid out on a ``grids[i] = (rows, cols)`` grid:
    ``llm_tokens[i]`` go to the LLM (post-projector, ``[N_i, d_llm]``); ``features[i]`` are the
    pre-projector vision features the pruning policy sees (``[N_i, d_v]``); ``attention[i]`` is the
    attention signal the heuristics use (``[N_i]``, only when asked for). Fixed-size encoders
    (LLaVA) give stacked ``[B, N, d]`` tensors, dynamic ones (Qwen2.5-VL) lists.
    """

    llm_tokens: torch.Tensor | list[torch.Tensor]
    features: torch.Tensor | list[torch.Tensor]
    attention: torch.Tensor | list[torch.Tensor] | None
    grids: list[Grid]

    def positions(self, i: int) -> torch.Tensor:
        """``[N_i, 2]`` (row, column) of image ``i``'s tokens in raster order."""
        rows, cols = self.grids[i]
        index = torch.arange(rows * cols)
        return torch.stack([index // cols, index % cols], dim=1)


@dataclass
class Row:
    """One sample's LLM input before packing: text ids around the kept visual tokens, the
    teacher-forced targets (positions counted from the first id after the visual tokens), the kept
    original indices (sorted) and the token grid of the image."""

    before: list[int]
    visual: torch.Tensor
    after: list[int]
    targets: list[tuple[int, int]]
    keep: torch.Tensor
    grid: Grid | None


@dataclass
class LlmBatch:
    """Left-padded LLM inputs; ``targets[i]`` lists (absolute position, token id) to score,
    ``visual_mask`` marks the positions that hold visual tokens. ``position_ids`` is ``[B, L]``
    (1-D RoPE) or ``[3, B, L]`` (M-RoPE)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: list[list[tuple[int, int]]]
    visual_mask: torch.Tensor


class Backbone:
    """A transformers vision-language model driven with kept-token indices.

    Adapters set ``end_id`` (the token that ends the assistant's turn) and ``answer_separator``
    (text between the generation prompt and the answer) and implement ``prompt``, ``encode`` and
    ``position_ids``.
    """

    answer_separator = " "
    end_id: int
    projects_features = False  # whether project() rebuilds the LLM tokens from stored features

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.image_token_id = model.config.image_token_id
        self._prompt_ids = lru_cache(maxsize=65536)(self._tokenize_prompt)
        self.answer_ids = lru_cache(maxsize=65536)(self._answer_ids)

    @property
    def language_model(self):
        """The decoder stack (embeddings, layers, final norm, rotary embedding)."""
        return self.model.model.language_model

    # ---- adapter-specific ----------------------------------------------------------------
    def prompt(self, question: str) -> str:
        raise NotImplementedError

    def encode(self, images: Sequence, with_attention: bool = False) -> VisualTokens:
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """LLM-ready visual tokens from the stored pre-projector features (where ``projects_features``)."""
        raise BackboneError(
            f"{type(self).__name__} cannot rebuild its visual tokens from the features (its merger needs every "
            "patch): use the LLM tokens its precompute stores (llm_tokens)"
        )

    def position_ids(self, rows: list[Row], mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- prompts -------------------------------------------------------------------------
    def _tokenize_prompt(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ids = self.tokenizer(self.prompt(question), add_special_tokens=True)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise BackboneError(f"prompt for {question!r} must hold exactly one image token")
        cut = ids.index(self.image_token_id)
        return tuple(ids[:cut]), tuple(ids[cut + 1 :])

    def text_tokens(self, question: str) -> int:
        """Prompt tokens around the image for ``question`` (the text part of the LLM input)."""
        before, after = self._prompt_ids(question)
        return len(before) + len(after)

    def _answer_ids(self, question: str, answer: str) -> tuple[int, ...]:
        """Token ids of ``answer`` as the assistant's reply to ``question``, then the end of turn."""
        prompt = self.prompt(question)
        full = self.tokenizer(f"{prompt}{self.answer_separator}{answer}", add_special_tokens=True)["input_ids"]
        head = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if full[: len(head)] != head or len(full) == len(head):
            raise BackboneError(f"answer {answer!r} does not tokenise as a continuation of the prompt")
        return tuple(full[len(head) :]) + (self.end_id,)

    def query_embedding(self, question: str) -> torch.Tensor:
        """The MDP's query vector ``q``: the mean LLM input embedding over the question's own tokens
        (no chat template, no special tokens), ``[d_llm]``."""
        ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BackboneError(f"question {question!r} has no tokens")
        with torch.no_grad():
            return self.model.get_input_embeddings()(torch.tensor(ids, device=self.device)).mean(dim=0)

    # ---- LLM inputs ----------------------------------------------------------------------
    def build_inputs(
        self,
        questions: list[str],
        tokens,
        keep: list[torch.Tensor] | None,
        answers: list[str] | None = None,
        grids: list[Grid] | None = None,
    ) -> LlmBatch:
        """Splice each sample's kept visual tokens (``tokens[i]``: ``[N_i, d_llm]``) into its prompt
        (and teacher-forced answer); left-pad. ``grids`` is needed by adapters with 2-D positions."""
        rows = []
        for i, question in enumerate(questions):
            before, after = self._prompt_ids(question)
            n = tokens[i].shape[0]
            kept = torch.arange(n, device=self.device) if keep is None else torch.sort(keep[i].to(self.device)).values
            answer = self.answer_ids(question, answers[i]) if answers is not None else []
            # the last prompt token predicts answer[0], each answer token the next, the last one the end
            first = len(after) - 1
            rows.append(
                Row(
                    list(before),
                    tokens[i][kept],
                    list(after) + list(answer[:-1]),
                    [(first + j, tok) for j, tok in enumerate(answer)],
                    kept,
                    None if grids is None else tuple(grids[i]),
                )
            )
        return self.pack(rows)

    def pack(self, rows: list[Row]) -> LlmBatch:
        """Left-padded LLM inputs: one embedding call for all text ids, one scatter for all visual tokens."""
        if any(row.visual.shape[0] == 0 for row in rows):
            raise BackboneError("at least one visual token must be kept")
        lengths = [len(row.before) + row.visual.shape[0] + len(row.after) for row in rows]
        width, pad_id = max(lengths), self.tokenizer.pad_token_id or 0
        ids, is_visual, targets = [], [], []
        for row, length in zip(rows, lengths):
            pad, k = width - length, row.visual.shape[0]
            ids.append([pad_id] * (pad + len(row.before) + k) + row.after)
            ids[-1][pad : pad + len(row.before)] = row.before
            is_visual.append([False] * (pad + len(row.before)) + [True] * k + [False] * len(row.after))
            targets.append([(pad + len(row.before) + k + p, t) for p, t in row.targets])
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        visual_mask = torch.tensor(is_visual, device=self.device)
        embeds = self.model.get_input_embeddings()(ids_t)
        visual = torch.cat([row.visual for row in rows]).to(embeds.device, embeds.dtype)
        # out of place: in training the embeddings may be a leaf that requires grad (gradient checkpointing)
        embeds = embeds.masked_scatter(visual_mask[..., None], visual)
        mask = (
            torch.arange(width, device=self.device)[None, :]
            >= torch.tensor([width - n for n in lengths], device=self.device)[:, None]
        ).long()
        embeds = embeds * mask[..., None]
        return LlmBatch(embeds, mask, self.position_ids(rows, mask), targets, visual_mask)

    def logits(self, batch: LlmBatch, model=None, **kwargs):
        """The forward over ``batch`` by ``model`` (default: this backbone's; a DDP-wrapped one in training)."""
        return (self.model if model is None else model)(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            **kwargs,
        )

    def target_logits(self, batch: LlmBatch, model=None):
        """Logits at every teacher-forced target of ``batch`` (``[T, V]``, float) with each target's row,
        token id and whether it is an answer token (every target but a row's final end of turn)."""
        # left padding puts every answer at the end of its row: project only those positions
        width = batch.inputs_embeds.shape[1]
        tail = width - min(p for tgt in batch.targets for p, _ in tgt)
        logits = self.logits(batch, model, logits_to_keep=tail).logits
        row = torch.tensor([i for i, tgt in enumerate(batch.targets) for _ in tgt], device=self.device)
        pos = torch.tensor([p - (width - tail) for tgt in batch.targets for p, _ in tgt], device=self.device)
        tok = torch.tensor([t for tgt in batch.targets for _, t in tgt], device=self.device)
        is_answer = torch.tensor(
            [j < len(tgt) - 1 for tgt in batch.targets for j in range(len(tgt))], device=self.device
        )
        return logits[row, pos].float(), row, tok, is_answer

    # ---- scoring and decoding ------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        questions: list[str],
        answers: list[str],
        tokens,
        keep: list[torch.Tensor] | None = None,
        grids: list[Grid] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: mean log-likelihood of the answer tokens, and whether greedy decoding
        reproduces the answer (every answer token and the end of turn are the argmax)."""
        batch = self.build_inputs(questions, tokens, keep, answers, grids)
        picked, row, tok, is_answer = self.target_logits(batch)
        n = len(batch.targets)
        token_logp = torch.log_softmax(picked, dim=-1).gather(1, tok[:, None])[:, 0] * is_answer
        mean_logp = torch.zeros(n, device=self.device).index_add_(0, row, token_logp) / torch.zeros(
            n, device=self.device
        ).index_add_(0, row, is_answer.float())
        return mean_logp.cpu(), all_argmax(picked, row, tok, n).cpu()

    @torch.no_grad()
    def generate_ids(
        self,
        questions: list[str],
        tokens,
        keep: list[torch.Tensor] | None = None,
        grids: list[Grid] | None = None,
        max_new_tokens: int = 8,
        stop_at_end: bool = True,
        on_first=None,
    ) -> list[list[int]]:
        """Greedy token ids with a KV cache (see :meth:`greedy_ids`), stopping each sample at the end of its
        turn (or, with ``stop_at_end=False``, always running ``max_new_tokens`` steps, as latency benchmarks need)."""
        batch = self.build_inputs(questions, tokens, keep, grids=grids)
        out = self.logits(batch, use_cache=True, logits_to_keep=1)
        # text positions after the prompt continue from the last one (all M-RoPE axes alike)
        state = {"mask": batch.attention_mask, "pos": batch.position_ids[..., -1:], "cache": out.cache}

        def step(token: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            state["pos"] = state["pos"] + 1
            nxt = self.model(
                inputs_embeds=self.model.get_input_embeddings()(token[:, None]),
                attention_mask=state["mask"],
                position_ids=state["pos"],
                cache=state["cache"],
                use_cache=True,
            )
            state["cache"] = nxt.cache
            return nxt.logits[:, -1]

        return self.greedy_ids(out.logits[:, -1], step, max_new_tokens, stop_at_end, on_first)

    def generate(
        self,
        questions: list[str],
        tokens,
        keep: list[torch.Tensor] | None = None,
        grids: list[Grid] | None = None,
        max_new_tokens: int = 8,
        stop_at_end: bool = True,
    ) -> list[str]:
        """Greedy answers from each sample's kept visual tokens (:meth:`generate_ids`, decoded)."""
        return self.decode(self.generate_ids(questions, tokens, keep, grids, max_new_tokens, stop_at_end))

    @torch.no_grad()
    def greedy_ids(
        self, logits: torch.Tensor, step, max_new_tokens: int, stop_at_end: bool = True, on_first=None
    ) -> list[list[int]]:
        """Greedy token ids from first-token ``logits`` ``[B, V]``; ``step(tokens)`` returns the next logits;
        ``on_first()`` is called once the first tokens are chosen (time to first token). Each sample's ids
        end with the end of turn if it finished; decoding stops when all are finished."""
        end = self.end_id
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens = []
        for i in range(max_new_tokens):
            nxt = torch.where(done, torch.full_like(done, end, dtype=torch.long), logits.argmax(-1))
            tokens.append(nxt)
            if i == 0 and on_first is not None:
                on_first()
            done |= (nxt == end) & stop_at_end
            if done.all() or i == max_new_tokens - 1:
                break
            logits = step(nxt)
        seqs = torch.stack(tokens, dim=1).tolist()
        return [s[: s.index(end) + 1] if end in s and stop_at_end else s for s in seqs]

    def decode(self, sequences: list[list[int]]) -> list[str]:
        """The answer text of each id sequence (up to its end of turn)."""
        end = self.end_id
        return [
            self.tokenizer.decode(s[: s.index(end)] if end in s else s, skip_special_tokens=True).strip()
            for s in sequences
        ]
