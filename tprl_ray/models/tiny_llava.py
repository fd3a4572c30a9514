"""The embedded default model: a tiny ``LlavaForConditionalGeneration`` for the digits benchmark.

Same classes as ``llava-hf/llava-1.5-7b-hf`` (CLIP vision tower, 2-layer GELU projector, Llama
decoder, ``LlavaProcessor`` with a chat template), only smaller, with a word-level tokenizer over
the benchmark's vocabulary. Saved with ``save_pretrained`` so the loaders for real checkpoints load it.
"""

from __future__ import annotations

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tprl_ray.data.digits import CELL_NAMES, IMAGE_SIZE
from tprl_ray.models.config import TinyLlavaSize
from tprl_ray.models.word_tokenizer import word_level_tokenizer

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
WORDS = (
    "USER",
    "ASSISTANT",
    ":",
    "?",
    "what",
    "digit",
    "is",
    "at",
    "there",
    "a",
    "how",
    "many",
    "are",
    "where",
    "the",
    "yes",
    "no",
    "none",
    *map(str, range(10)),
    *CELL_NAMES,
)
# LLaVA-1.5's vicuna_v1 turn structure without its long system prompt: "USER: <image> q ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(
        SPECIAL_TOKENS, WORDS, unk="<unk>", pad="<pad>", eos="</s>", bos="<s>", extra_special={"image_token": "<image>"}
    )


def build_processor(size: TinyLlavaSize) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(size: TinyLlavaSize, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 2,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=size.patch_size,
        num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)
