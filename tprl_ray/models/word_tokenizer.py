"""Word-level tokenizers for the tiny models: a closed vocabulary, whitespace splitting, fast tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def word_level_tokenizer(
    special: tuple[str, ...],
    words: tuple[str, ...],
    *,
    unk: str,
    pad: str,
    eos: str,
    bos: str | None = None,
    extra_special: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over ``special + words`` (ids in that order); ``bos`` if given is
    prepended to every encoding; ``extra_special`` names model tokens (e.g. ``image_token``)."""
    vocab = {tok: i for i, tok in enumerate((*special, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        extra_special_tokens=extra_special or {},
        padding_side="left",
    )
    named = {unk, pad, eos, bos}
    tok.add_special_tokens({"additional_special_tokens": [t for t in special if t not in named]})
    return tok
