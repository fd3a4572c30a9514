"""FastV inside the LLM, on tiny LLaVA and Qwen2.5-VL: selection rule, per-layer caches, decoding."""

import pytest
import torch

from tprl_ray.backbones.base import BackboneError
from tprl_ray.backbones.inllm import fastv_generate, fastv_prefill, pruned_step
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


def eager_attentions(backbone, batch):
    """The model's forward with eager attention, which returns its weights (SDPA returns none)."""
    backbone.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return backbone.logits(batch, output_attentions=True)
    finally:
        backbone.model.set_attn_implementation("sdpa")


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
    out = eager_attentions(backbone, batch)
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
        logits = pruned_step(backbone, state, token)
        reference, _, kept_ref = fastv_prefill(
            backbone, questions, features, k=2, n_keep=12, grids=grids, extra_ids=torch.stack(generated, dim=1)
        )
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
        assert torch.equal(kept, kept_ref)


def test_sparsevlm_raters_are_the_text_tokens_above_the_mean_relevance():
    """One row: [text, v, v, t1, t2, t3] with v = x, t1 = 2x, t2 = t3 = 0. Each visual token's dot
    products with the text after the image are (2, 0, 0): softmax (.787, .107, .107), above the mean
    1/3 only for t1."""
    from tprl_ray.backbones.inllm import select_raters

    x = torch.tensor([1.0, 0.0])
    embeds = torch.stack([x, x, x, 2 * x, 0 * x, 0 * x])[None]
    visual = torch.tensor([[False, True, True, False, False, False]])
    raters = select_raters(embeds, visual, torch.ones_like(visual))
    assert raters.tolist() == [[False, False, False, True, False, False]]


def test_sparsevlm_schedule_and_per_layer_counts():
    from tprl_ray.pruners.sparsevlm import SparseVLM, schedule, stage_layers

    assert stage_layers(32) == [2, 6, 15] and stage_layers(4) == [0, 1, 2] and stage_layers(3) == [0, 1]
    assert [(s.after_layer, s.keep) for s in schedule(576, 64, 32)] == [(2, 277), (6, 133), (15, 64)]
    counts = SparseVLM().layer_tokens(64, 16, 4)  # 64 (16/64)^(1/3) = 40.3, 64 (16/64)^(2/3) = 25.4
    assert counts == [64, 40, 25, 16]
    layers = SparseVLM().layer_tokens(576, 192, 32)
    assert layers[:3] == [576] * 3 and layers[3] == 399 and layers[7] == 277 and layers[16:] == [192] * 16


def test_sparsevlm_ranks_by_the_raters_attention_and_caches_each_stage(setup):
    """One stage after layer 0 keeps the visual tokens the raters attend to most there (eager
    attention, head-averaged, mean over raters); with the full schedule each layer caches what it saw."""
    from tprl_ray.backbones.inllm import Stage, rater_ranking, select_raters, staged_prefill
    from tprl_ray.pruners.sparsevlm import schedule

    backbone, questions, features, grids, n = setup
    _, _, kept = staged_prefill(backbone, questions, features, [Stage(0, 7)], rater_ranking, grids)
    batch = backbone.build_inputs(questions, features, None, grids=grids)
    raters = select_raters(batch.inputs_embeds, batch.visual_mask, batch.attention_mask.bool())
    out = eager_attentions(backbone, batch)
    attention = out.attentions[0].mean(dim=1)  # [B, L, L], layer 0
    for i in range(len(questions)):
        visual = batch.visual_mask[i].nonzero()[:, 0]
        score = attention[i][raters[i]][:, visual].mean(dim=0)
        assert raters[i].any() and kept[i].tolist() == torch.sort(score.topk(7).indices).values.tolist()
    stages = schedule(n, 6, 3)  # 3 decoder layers: stages after layers 0 and 1
    _, state, kept = staged_prefill(backbone, questions, features, stages, rater_ranking, grids)
    full = batch.inputs_embeds.shape[1]
    assert [layer.keys.shape[2] for layer in state.cache.layers] == [full, full - n + stages[0].keep, full - n + 6]
    assert kept.shape == (len(questions), 6)
