"""FastV inside the LLM: selection rule, per-layer caches and decoding against a no-cache reference."""

import pytest
import torch

from tprl_ray.backbones.fastv import fastv_generate, fastv_prefill, fastv_step
from tprl_ray.backbones.llava import BackboneError, LlavaBackbone
from tprl_ray.data.layout import load_image, read_split
from tprl_ray.models.tiny_llava import TinyLlavaSize, build_model, build_processor

SIZE = TinyLlavaSize(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=3,
                     text_heads=2, text_intermediate=64)


@pytest.fixture(scope="module")
def setup(digits_dir):
    torch.manual_seed(0)
    processor = build_processor(SIZE)
    backbone = LlavaBackbone(build_model(SIZE, processor.tokenizer), processor)
    samples = read_split(digits_dir / "test")[:5]
    with torch.no_grad():
        features = backbone.image_features(backbone.pixel_values(
            [load_image(digits_dir / "test", s.image) for s in samples]))
    return backbone, [s.text for s in samples], features


def test_keeping_everything_is_the_plain_model(setup):
    backbone, questions, features = setup
    logits, _, kept = fastv_prefill(backbone, questions, features, k=2, n_keep=64)
    with torch.no_grad():
        plain = backbone.logits(backbone.build_inputs(questions, features, None)).logits[:, -1]
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=0)
    assert kept.tolist() == [list(range(64))] * len(questions)
    assert fastv_generate(backbone, questions, features, k=2, n_keep=64, max_new_tokens=4)[0] == \
        backbone.generate(questions, features, max_new_tokens=4)


def test_ranking_is_the_last_prompt_tokens_attention_at_layer_k_minus_1(setup):
    backbone, questions, features = setup
    _, _, kept = fastv_prefill(backbone, questions, features, k=2, n_keep=10)
    batch = backbone.build_inputs(questions, features, None)
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
    backbone, questions, features = setup
    _, state, _ = fastv_prefill(backbone, questions, features, k=1, n_keep=7)
    full = backbone.build_inputs(questions, features, None).inputs_embeds.shape[1]
    lengths = [layer.keys.shape[2] for layer in state.cache.layers]
    assert lengths == [full, full - 64 + 7, full - 64 + 7]
    with pytest.raises(BackboneError, match="FastV layer"):
        fastv_prefill(backbone, questions, features, k=3, n_keep=7)


def test_cached_decoding_matches_a_no_cache_recompute(setup):
    backbone, questions, features = setup
    logits, state, kept = fastv_prefill(backbone, questions, features, k=2, n_keep=12)
    generated = []
    for _ in range(4):
        token = logits.argmax(-1)
        generated.append(token)
        logits = fastv_step(backbone, state, token)
        reference, _, kept_ref = fastv_prefill(backbone, questions, features, k=2, n_keep=12,
                                               extra_ids=torch.stack(generated, dim=1))
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
        assert torch.equal(kept, kept_ref)
