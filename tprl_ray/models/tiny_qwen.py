"""A tiny ``Qwen2_5_VLForConditionalGeneration`` with the digits vocabulary: the second embedded model
(trained by `tprl model tiny --family qwen`) and, with random weights, a test model.

Same classes and token layout as ``Qwen/Qwen2.5-VL-3B-Instruct`` (windowed vision blocks with a
last full-attention block, 2x2 PatchMerger, M-RoPE, ``<|im_start|>`` chat template), only small.
The test defaults use 8-px patches (a 96x96 board gives a 6x6 grid of 36 LLM tokens); the embedded
model uses 6-px patches, so a 96-px 4x4 board gives 8x8 tokens and a 144-px 6x6 board 12x12.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tprl_ray.data.digits import ALL_CELL_NAMES
from tprl_ray.models.config import TinyQwenSize
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
# The test model's sizes (random weights); the embedded model's are TinyQwenSize's defaults.
TEST_SIZE = TinyQwenSize(
    vision_hidden=32,
    vision_depth=2,
    vision_heads=2,
    patch_size=PATCH,
    window_tokens=2,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    text_intermediate=64,
    rope_theta=1e6,
    mrope_section=[1, 1, 2],
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    extra_cells = tuple(name for name in ALL_CELL_NAMES if name not in WORDS)
    tok = word_level_tokenizer(
        SPECIAL_TOKENS,
        (*WORDS[2:], *extra_cells, *CHAT_WORDS),
        unk="<unk>",
        pad="<|endoftext|>",
        eos="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor(patch_size: int = PATCH) -> Qwen2VLImageProcessorPil:
    """Images keep their size (rounded to a multiple of ``patch_size * MERGE``) between 32x32 and 192x192."""
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=MERGE,
        temporal_patch_size=2,
        min_pixels=32 * 32,
        max_pixels=192 * 192,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    size: TinyQwenSize = TEST_SIZE,
    layers: int | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """The model of ``size`` (``layers`` overrides its text depth)."""
    ids = tokenizer.convert_tokens_to_ids
    section = size.mrope_section or [1] * (size.text_hidden // size.text_heads // 2)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.text_hidden,
            intermediate_size=size.text_intermediate,
            num_hidden_layers=layers or size.text_layers,
            num_attention_heads=size.text_heads,
            num_key_value_heads=max(1, size.text_heads // 2),
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": size.rope_theta,
                "mrope_section": section,
            },
            tie_word_embeddings=True,
            bos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden,
            num_heads=size.vision_heads,
            out_hidden_size=size.text_hidden,
            patch_size=size.patch_size,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            window_size=size.window_tokens * size.patch_size * MERGE,
            fullatt_block_indexes=[size.vision_depth - 1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config)
