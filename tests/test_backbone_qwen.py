"""The Qwen2.5-VL adapter against the stock transformers forward, on a tiny random Qwen2.5-VL."""

import copy
import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from tprl_ray.backbones.backend import Backend
from tprl_ray.backbones.base import BackboneError
from tprl_ray.backbones.load import load_backbone
from tprl_ray.backbones.qwen import QwenBackbone
from tprl_ray.data.layout import load_image, read_split
from tprl_ray.models.tiny_qwen import build_image_processor, build_model, build_tokenizer


def make_backbone(full_attention: bool = False) -> QwenBackbone:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    if full_attention:
        model.model.visual.fullatt_block_indexes = list(range(model.config.vision_config.depth))
    return QwenBackbone(model, tokenizer, build_image_processor())


@pytest.fixture(scope="module")
def backbone():
    return make_backbone()


@pytest.fixture(scope="module")
def batch(digits_dir):
    """Six questions on boards of two sizes: 96x96 (6x6 tokens) and 128x64 (4x8 tokens)."""
    samples = read_split(digits_dir / "test")[:6]
    images = [load_image(digits_dir / "test", s.image) for s in samples]
    images = [im if i % 2 == 0 else im.resize((128, 64)) for i, im in enumerate(images)]
    return samples, images


def stock_inputs(backbone, images, texts, grids):
    """What the stock processor would build: ``<|image_pad|>`` repeated once per LLM token."""
    pixel_values, grid_thw = backbone.pixel_inputs(images)
    pad = backbone.image_token_id
    ids = []
    for text, (rows, cols) in zip(texts, grids):
        raw = backbone.tokenizer(text)["input_ids"]
        cut = raw.index(pad)
        ids.append(raw[:cut] + [pad] * (rows * cols) + raw[cut + 1 :])
    width = max(map(len, ids))
    input_ids = torch.tensor([[backbone.tokenizer.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    return dict(
        input_ids=input_ids,
        attention_mask=mask,
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        mm_token_type_ids=(input_ids == pad).int(),
    )


def test_dynamic_token_counts_and_grids(backbone, batch):
    _, images = batch
    out = backbone.encode(images, with_attention=True)
    assert out.grids[:2] == [(6, 6), (4, 8)]
    assert [t.shape for t in out.llm_tokens[:2]] == [(36, 32), (32, 32)]
    assert [f.shape for f in out.features[:2]] == [(36, 32), (32, 32)] and out.attention[1].shape == (32,)
    assert backbone.encode(images).attention is None


def test_all_tokens_kept_equals_stock_forward(backbone, batch):
    samples, images = batch
    visual = backbone.encode(images)
    logp, _ = backbone.score(
        [s.text for s in samples], [s.answer for s in samples], visual.llm_tokens, grids=visual.grids
    )
    for i, s in enumerate(samples):
        text = backbone.prompt(s.text) + s.answer
        with torch.no_grad():
            logits = backbone.model(
                **stock_inputs(backbone, images[i : i + 1], [text], visual.grids[i : i + 1])
            ).logits[0]
        answer = backbone.answer_ids(s.text, s.answer)[:-1]
        rows = torch.log_softmax(logits[-len(answer) - 1 : -1], -1)
        expected = rows.gather(1, torch.tensor(answer)[:, None]).mean()
        assert logp[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_kept_tokens_keep_their_positions_in_the_full_sequence(backbone, batch):
    samples, images = batch
    visual = backbone.encode(images)
    questions = [s.text for s in samples]
    gen = torch.Generator().manual_seed(1)
    keep = [torch.randperm(len(t), generator=gen)[:k] for t, k in zip(visual.llm_tokens, (3, 30, 9, 1, 36, 12))]
    pruned = backbone.build_inputs(questions, visual.llm_tokens, keep, grids=visual.grids)
    full = stock_inputs(backbone, images, [backbone.prompt(q) for q in questions], visual.grids)
    reference, _ = backbone.model.model.get_rope_index(
        full["input_ids"], full["mm_token_type_ids"], full["image_grid_thw"], attention_mask=full["attention_mask"]
    )
    for i, q in enumerate(questions):
        before, after = backbone._prompt_ids(q)
        n = len(visual.llm_tokens[i])
        real = full["attention_mask"][i].bool()
        kept_index = torch.cat(
            [
                torch.arange(len(before)),
                len(before) + torch.sort(keep[i]).values,
                len(before) + n + torch.arange(len(after)),
            ]
        )
        expected = reference[:, i, real][:, kept_index]
        assert torch.equal(pruned.position_ids[:, i, pruned.attention_mask[i].bool()], expected)


def test_mixed_sizes_and_keep_counts_match_one_by_one(backbone, batch):
    samples, images = batch
    visual = backbone.encode(images)
    gen = torch.Generator().manual_seed(0)
    keep = [torch.randperm(len(t), generator=gen)[:k] for t, k in zip(visual.llm_tokens, (1, 5, 16, 32, 36, 20))]
    qs, ans, grids = [s.text for s in samples], [s.answer for s in samples], visual.grids
    logp, correct = backbone.score(qs, ans, visual.llm_tokens, keep, grids)
    texts = backbone.generate(qs, visual.llm_tokens, keep, grids, max_new_tokens=4)
    for i in range(len(samples)):
        one = (visual.llm_tokens[i : i + 1], keep[i : i + 1], grids[i : i + 1])
        lp, c = backbone.score(qs[i : i + 1], ans[i : i + 1], *one)
        assert logp[i].item() == pytest.approx(lp.item(), abs=1e-4) and correct[i] == c[0]
        assert texts[i] == backbone.generate(qs[i : i + 1], *one, max_new_tokens=4)[0]


def test_generate_matches_stock_generate(backbone, batch):
    samples, images = batch
    visual = backbone.encode(images)
    ours = backbone.generate([s.text for s in samples], visual.llm_tokens, grids=visual.grids, max_new_tokens=4)
    for i, s in enumerate(samples):
        inputs = stock_inputs(backbone, images[i : i + 1], [backbone.prompt(s.text)], visual.grids[i : i + 1])
        out = backbone.model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=backbone.end_id,
            pad_token_id=backbone.tokenizer.pad_token_id,
        )
        stock = out[0, inputs["input_ids"].shape[1] :].tolist()
        stock = stock[: stock.index(backbone.end_id)] if backbone.end_id in stock else stock
        assert ours[i] == backbone.tokenizer.decode(stock, skip_special_tokens=True).strip()


def test_encode_returns_raster_order_and_the_attention_each_group_receives(batch):
    """Window attention permutes the patches; with full attention in every block the permutation
    must not change anything, so a copy whose single window covers the image (identity order)
    is the reference, and HF's own eager attention of its last block gives the received attention."""
    _, images = batch
    windowed = make_backbone(full_attention=True)
    reference = copy.deepcopy(windowed)
    reference.model.model.visual.window_size = 10**4
    recorded = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        recorded.append(weights)
        return out, weights

    AttentionInterface.register("tprl_recording", recording)
    reference.model.set_attn_implementation({"vision_config": "tprl_recording"})
    out = windowed.encode(images[:2], with_attention=True)
    recorded.clear()
    ref = reference.encode(images[:2])
    for i in range(2):
        torch.testing.assert_close(out.llm_tokens[i], ref.llm_tokens[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.features[i], ref.features[i], atol=1e-5, rtol=0)
        received = recorded[-2 + i][0].mean(dim=(0, 1))  # last block, image i: mean over heads and queries
        torch.testing.assert_close(out.attention[i], received.view(-1, 4).mean(dim=1), atol=1e-6, rtol=0)


def test_loader_picks_the_adapter_and_refuses_foreign_or_mismatched_checkpoints(backbone, tmp_path):
    from transformers import LlamaConfig

    backbone.model.save_pretrained(tmp_path / "qwen")
    backbone.tokenizer.save_pretrained(tmp_path / "qwen")
    backbone.image_processor.save_pretrained(tmp_path / "qwen")
    loaded = load_backbone(tmp_path / "qwen")
    assert isinstance(loaded, QwenBackbone) and loaded.prompt("is there a 7 ?") == backbone.prompt("is there a 7 ?")
    assert isinstance(loaded, Backend)  # the seam the scorer and the evaluation engine use
    config = json.loads((tmp_path / "qwen" / "config.json").read_text())
    config["vision_config"]["out_hidden_size"] = 48
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="weights do not match config.json"):
        load_backbone(tmp_path / "qwen")
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(BackboneError, match=r"model type 'llama' is not supported \(LLaVA-1.5: 'llava', Qwen2.5-VL"):
        load_backbone(tmp_path / "llama")
    with pytest.raises(BackboneError, match="not a loadable model checkpoint"):
        load_backbone(tmp_path / "empty")


def test_fastv_refuses_a_batch_of_different_token_counts(backbone, batch):
    from tprl_ray.backbones.inllm import fastv_prefill

    samples, images = batch
    visual = backbone.encode(images[:2])
    with pytest.raises(BackboneError, match="same visual token count"):
        fastv_prefill(backbone, [s.text for s in samples[:2]], visual.llm_tokens, k=1, n_keep=4, grids=visual.grids)
