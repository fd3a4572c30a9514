"""The shipped config.json files of the paper's models: their classes, shapes and parameter counts."""

import pytest
import torch
from transformers import AutoConfig, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from tprl_ray.config import PAPER_CONFIGS

EXPECTED = {  # (class, text hidden, layers, heads, kv heads, vision hidden, billions of parameters)
    "llava-1.5-7b": (LlavaForConditionalGeneration, 4096, 32, 32, 32, 1024, 7.06),
    "llava-1.5-13b": (LlavaForConditionalGeneration, 5120, 40, 40, 40, 1024, 13.35),
    "qwen2.5-vl-3b": (Qwen2_5_VLForConditionalGeneration, 2048, 36, 16, 2, 1280, 3.75),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_model_shapes(name):
    cls, hidden, layers, heads, kv_heads, vision_hidden, billions = EXPECTED[name]
    config = AutoConfig.from_pretrained(PAPER_CONFIGS[name])
    text = config.text_config
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
        config.vision_config.hidden_size,
    ) == (hidden, layers, heads, kv_heads, vision_hidden)
    with torch.device("meta"):
        model = cls(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
