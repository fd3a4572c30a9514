"""A tiny random ``Qwen2_5_VLForConditionalGeneration`` with the digits vocabulary, for tests and benches.

Same classes and token layout as ``Qwen/Qwen2.5-VL-3B-Instruct`` (windowed vision blocks with a
last full-attention block, 2x2 PatchMerger, M-RoPE, ``<|im_start|>`` chat template), only small:
8-px patches, so a 96x96 board gives a 6x6 grid of 36 LLM tokens and other sizes give other grids.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tprl_ray.models.tiny_llava import WORDS
from tprl_ray.models.word_tokenizer import word_level_tokenizer

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)
CHAT_WORDS = ("system", "user", "assistant", "You", "helpful", ".")
# Qwen2-VL's template for one image and text per user turn, with its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH, MERGE = 8, 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = word_level_tokenizer(
        SPECIAL_TOKENS, (*WORDS[2:], *CHAT_WORDS), unk="<unk>", pad="<|endoftext|>", eos="<|im_end|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=128 * 128
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden: int = 32,
    layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            window_size=2 * PATCH * MERGE,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config)
