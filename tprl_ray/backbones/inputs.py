"""What the driver checks against a model before any compute starts, from its config and tokenizer
alone (no weights): budgets against its visual tokens, question lengths, words outside its vocabulary,
and the widths a learned pruner must match."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tprl_ray.backbones.base import BackboneError, check_adapter, checkpoint_config
from tprl_ray.backbones.families import family_of
from tprl_ray.config import BackboneConfig
from tprl_ray.data.layout import Reject, Sample

TEMPLATE_TOKENS = 64  # room left for the prompt template around the question
EXAMPLES = 5


@dataclass(frozen=True)
class ModelInputs:
    """A checkpoint's input limits: ``visual_tokens`` per image (None where they depend on the image),
    its ``context`` length, the widths of its vision features and LLM embeddings, and its tokenizer."""

    path: str
    visual_tokens: int | None
    context: int
    feature_width: int
    embedding_width: int
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def load(cls, cfg: BackboneConfig) -> ModelInputs:
        path = cfg.resolved_path()
        config = checkpoint_config(path)
        if cfg.adapter is not None:
            check_adapter(cfg.adapter)
        try:
            family = family_of(config)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise BackboneError(f"{path}: {str(exc).splitlines()[0]}") from None
        text = config.text_config
        return cls(
            str(path),
            family.fixed_tokens(config),
            text.max_position_embeddings,
            config.vision_config.hidden_size,
            text.hidden_size,
            tokenizer,
        )

    def question_cap(self, cfg: BackboneConfig, answer_tokens: int) -> int:
        """``cfg.max_question_tokens``, or what fits the context beside the image, answer and template."""
        if cfg.max_question_tokens is not None:
            return cfg.max_question_tokens
        return self.context - (self.visual_tokens or 0) - answer_tokens - TEMPLATE_TOKENS

    def question_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def within_length(
        self, samples: list[Sample], cfg: BackboneConfig, answer_tokens: int | Callable[[Sample], int]
    ) -> tuple[list[Sample], list[Reject]]:
        """The samples whose question fits :meth:`question_cap` beside ``answer_tokens`` (a count, or
        one per sample), and a reject for each other one."""
        kept, rejects = [], []
        for s in samples:
            n = self.question_tokens(s.text)
            cap = self.question_cap(cfg, answer_tokens(s) if callable(answer_tokens) else answer_tokens)
            if n > cap:
                reason = (
                    f"question {s.question_id} has {n} tokens, over the cap of {cap} (backbone.max_question_tokens)"
                )
                rejects.append(Reject(s.question_id, s.image, reason))
            else:
                kept.append(s)
        return kept, rejects

    def vocabulary(self, samples: list[Sample]) -> dict:
        """Words of the questions that the tokenizer maps to its unknown token: how many questions hold
        one, how many such words there are, and a few of them."""
        unk = self.tokenizer.unk_token_id
        unknown: dict[str, bool] = {}
        questions = words = 0
        for s in samples:
            found = 0
            for word in s.text.split():
                if word not in unknown:
                    ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
                    unknown[word] = unk is not None and unk in ids
                found += unknown[word]
            questions += found > 0
            words += found
        return {
            "questions": len(samples),
            "questions_with_unknown_words": questions,
            "unknown_words": words,
            "examples": [w for w, bad in unknown.items() if bad][:EXAMPLES],
        }

    def unknown_words(self, split: str, samples: list[Sample], stage: str) -> dict:
        """:meth:`vocabulary` of ``split``'s ``samples``, and a warning line (``[stage] warning: ...``)
        when they hold a word outside the vocabulary."""
        counts = self.vocabulary(samples)
        if counts["unknown_words"]:
            print(
                f"[{stage}] warning: {counts['questions_with_unknown_words']} of {counts['questions']} {split} "
                f"question(s) hold {counts['unknown_words']} word(s) outside the model's vocabulary (e.g. "
                f"{', '.join(counts['examples'])}); the model reads them as unknown tokens"
            )
        return counts
