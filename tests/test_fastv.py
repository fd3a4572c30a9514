"""FastV inside the LLM, on tiny LLaVA and Qwen2.5-VL: selection rule, per-layer caches, decoding."""

import pytest
import torch

from tprl_ray.backbones.base import BackboneError
from tprl_ray.backbones.fastv import fastv_generate, fastv_prefill, fastv_step
from tprl_ray.backbones.llava import LlavaBackbone
from tprl_ray.backbones.qwen import QwenBackbone
from tprl_ray.data.layout import load_image, read_split
from tprl_ray.models import tiny_llava, tiny_qwen

SIZE = tiny_llava.TinyLlavaSize(
    vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=3, text_heads=2, text_intermediate=64
)


@pytest.fixture(scope="module", params=["llava", "qwen"])
def setup(request, digits_dir):
    """(backbone, questions, visual tokens, grids, visual tokens per image)."""
    torch.manual_seed(0)
    if request.param == "llava":
        processor = tiny_llava.build_processor(SIZE)
        backbone = LlavaBackbone(tiny_llava.build_model(SIZE, processor.tokenizer), processor)
    else:
        tokenizer = tiny_qwen.build_tokenizer()
        backbone = QwenBackbone(
            tiny_qwen.build_model(tokenizer, layers=3), tokenizer, tiny_qwen.build_image_processor()
        )
    samples = read_split(digits_dir / "test")[:5]
    visual = backbone.encode([load_image(digits_dir / "test", s.image) for s in samples])
    return backbone, [s.text for s in samples], visual.llm_tokens, visual.grids, len(visual.llm_tokens[0])


def test_keeping_everything_is_the_plain_model(setup):
    backbone, questions, features, grids, n = setup
    logits, _, kept = fastv_prefill(backbone, questions, features, k=2, n_keep=n, grids=grids)
    with torch.no_grad():
        plain = backbone.logits(backbone.build_inputs(questions, features, None, grids=grids)).logits[:, -1]
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=0)
    assert kept.tolist() == [list(range(n))] * len(questions)
    assert fastv_generate(backbone, questions, features, k=2, n_keep=n, grids=grids, max_new_tokens=4)[
        0
    ] == backbone.generate(questions, features, grids=grids, max_new_tokens=4)


def test_ranking_is_the_last_prompt_tokens_attention_at_layer_k_minus_1(setup):
    backbone, questions, features, grids, _ = setup
    _, _, kept = fastv_prefill(backbone, questions, features, k=2, n_keep=10, grids=grids)
    batch = backbone.build_inputs(questions, features, None, grids=grids)
    backbone.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = backbone.logits(batch, output_attentions=True)
    finally:
        backbone.model.set_attn_implementation("sdpa")
    attention = out.attentions[1][:, :, -1].mean(dim=1)  # layer K-1 = 1, last prompt token
    for i in range(len(questions)):
        visual = batch.visual_mask[i].nonzero()[:, 0]
        expected = torch.sort(attention[i, visual].topk(10).indices).values
        assert kept[i].tolist() == expected.tolist()


def test_layers_from_k_cache_only_the_kept_tokens(setup):
    backbone, questions, features, grids, n = setup
    _, state, _ = fastv_prefill(backbone, questions, features, k=1, n_keep=7, grids=grids)
    full = backbone.build_inputs(questions, features, None, grids=grids).inputs_embeds.shape[1]
    lengths = [layer.keys.shape[2] for layer in state.cache.layers]
    assert lengths == [full, full - n + 7, full - n + 7]
    with pytest.raises(BackboneError, match="FastV layer"):
        fastv_prefill(backbone, questions, features, k=3, n_keep=7, grids=grids)


def test_cached_decoding_matches_a_no_cache_recompute(setup):
    backbone, questions, features, grids, _ = setup
    logits, state, kept = fastv_prefill(backbone, questions, features, k=2, n_keep=12, grids=grids)
    generated = []
    for _ in range(4):
        token = logits.argmax(-1)
        generated.append(token)
        logits = fastv_step(backbone, state, token)
        reference, _, kept_ref = fastv_prefill(
            backbone, questions, features, k=2, n_keep=12, grids=grids, extra_ids=torch.stack(generated, dim=1)
        )
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
        assert torch.equal(kept, kept_ref)
