"""The LLaVA adapter against the stock transformers forward, on a tiny random LLaVA."""

import pytest
import torch
from PIL import Image

from tprl_ray.backbones.llava import BackboneError, LlavaBackbone
from tprl_ray.data.layout import load_image, read_split
from tprl_ray.models.tiny_llava import TinyLlavaSize, build_model, build_processor

SIZE = TinyLlavaSize(
    vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64
)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    processor = build_processor(SIZE)
    return LlavaBackbone(build_model(SIZE, processor.tokenizer), processor)


@pytest.fixture(scope="module")
def batch(digits_dir):
    samples = read_split(digits_dir / "test")[:6]
    return samples, [load_image(digits_dir / "test", s.image) for s in samples]


def test_all_tokens_kept_equals_stock_forward(backbone, batch):
    samples, images = batch
    features = backbone.encode(images).llm_tokens
    logp, _ = backbone.score([s.text for s in samples], [s.answer for s in samples], features)
    for i, s in enumerate(samples):
        text = backbone.prompt(s.text) + " " + s.answer
        enc = backbone.processor(images=[images[i]], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits = backbone.model(**enc).logits[0]
        answer_tok = backbone.answer_ids(s.text, s.answer)[:-1]
        rows = torch.log_softmax(logits[-len(answer_tok) - 1 : -1], -1)
        expected = rows.gather(1, torch.tensor(answer_tok)[:, None]).mean()
        assert logp[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_mixed_keep_counts_match_one_by_one(backbone, batch):
    samples, images = batch
    features = backbone.encode(images).llm_tokens
    n = features.shape[1]
    gen = torch.Generator().manual_seed(0)
    keep = [torch.randperm(n, generator=gen)[:k] for k in (1, 5, 16, 33, 64, 20)]
    qs, ans = [s.text for s in samples], [s.answer for s in samples]
    logp, correct = backbone.score(qs, ans, features, keep)
    texts = backbone.generate(qs, features, keep)
    for i in range(len(samples)):
        lp, c = backbone.score(qs[i : i + 1], ans[i : i + 1], features[i : i + 1], keep[i : i + 1])
        assert logp[i].item() == pytest.approx(lp.item(), abs=1e-4) and correct[i] == c[0]
        assert texts[i] == backbone.generate(qs[i : i + 1], features[i : i + 1], keep[i : i + 1])[0]


def test_keep_order_does_not_matter_raster_order_is_used(backbone, batch):
    samples, images = batch
    features = backbone.encode(images[:1]).llm_tokens
    keep = torch.tensor([40, 3, 17, 8])
    a, _ = backbone.score([samples[0].text], [samples[0].answer], features, [keep])
    b, _ = backbone.score([samples[0].text], [samples[0].answer], features, [torch.sort(keep).values])
    assert a.item() == b.item()


def test_generate_matches_stock_generate(backbone, batch):
    samples, images = batch
    features = backbone.encode(images).llm_tokens
    ours = backbone.generate([s.text for s in samples], features, max_new_tokens=4)
    for i, s in enumerate(samples):
        enc = backbone.processor(images=[images[i]], text=[backbone.prompt(s.text)], return_tensors="pt")
        out = backbone.model.generate(**enc, max_new_tokens=4, do_sample=False)
        stock = backbone.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert ours[i] == stock.strip()


def test_empty_keep_set_is_refused(backbone, batch):
    samples, images = batch
    features = backbone.encode(images[:1]).llm_tokens
    with pytest.raises(BackboneError, match="at least one visual token"):
        backbone.score([samples[0].text], [samples[0].answer], features, [torch.tensor([], dtype=torch.long)])


def test_loading_a_non_llava_path_fails_clearly(tmp_path):
    with pytest.raises(BackboneError, match="not a loadable model checkpoint"):
        LlavaBackbone.from_pretrained(tmp_path)


def test_encode_gives_tokens_features_and_cls_attention(backbone, batch):
    _, images = batch
    pixel_values = backbone.pixel_values(images)
    out = backbone.encode(images, with_attention=True)
    assert backbone.model.config.vision_config._attn_implementation != "eager"  # restored after the call
    n = out.llm_tokens.shape[1]
    assert out.features.shape == (len(images), n, SIZE.vision_hidden) and out.attention.shape == (len(images), n)
    trainable, grids = backbone.trainable_tokens(images)
    torch.testing.assert_close(out.llm_tokens, torch.stack(trainable).detach(), atol=1e-5, rtol=0)
    assert grids == out.grids
    torch.testing.assert_close(out.features, backbone.encode(images).features, atol=1e-5, rtol=0)
    assert backbone.encode(images).attention is None and out.grids == [(8, 8)] * len(images)
    assert out.positions(0)[:10].tolist() == [[0, c] for c in range(8)] + [[1, 0], [1, 1]]
    # the [CLS] row of the feature layer's attention, computed by hand from that layer's q/k projections
    tower = backbone.model.model.vision_tower
    layers = tower.encoder.layers
    feature_layer = len(layers) + backbone.model.config.vision_feature_layer  # its output is the feature
    with torch.no_grad():
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for layer in layers[:feature_layer]:
            hidden = layer(hidden, attention_mask=None)
        attn = layers[feature_layer].self_attn
        x = layers[feature_layer].layer_norm1(hidden)
        heads, dim = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).view(len(images), -1, heads, dim).transpose(1, 2)
        k = attn.k_proj(x).view(len(images), -1, heads, dim).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5, dim=-1).mean(dim=1)
        features = layers[feature_layer](hidden, attention_mask=None)[:, 1:]
    torch.testing.assert_close(out.attention, weights[:, 0, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features, features, atol=1e-5, rtol=0)


def test_query_embedding_is_the_mean_of_the_question_tokens(backbone):
    q = backbone.query_embedding("is there a 7 ?")
    ids = backbone.tokenizer("is there a 7 ?", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    torch.testing.assert_close(q, backbone.model.get_input_embeddings().weight[ids].mean(0).detach())
    with pytest.raises(BackboneError, match="no tokens"):
        backbone.query_embedding("   ")


def test_loading_mismatched_or_foreign_checkpoints_fails_clearly(backbone, tmp_path):
    import json

    from transformers import LlamaConfig

    backbone.model.save_pretrained(tmp_path / "ok")
    backbone.processor.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 48
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="weights do not match config.json \\(vision hidden_size 48"):
        LlavaBackbone.from_pretrained(tmp_path / "ok")
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(BackboneError, match="model type 'llama' is not a LLaVA checkpoint"):
        LlavaBackbone.from_pretrained(tmp_path / "llama")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(
        json.dumps(json.loads((tmp_path / "ok" / "config.json").read_text()))
    )
    with pytest.raises(BackboneError, match="no loadable weights"):
        LlavaBackbone.from_pretrained(tmp_path / "bare")


def test_checkpoints_load_with_vicuna_v1_prompts_and_pad_to_square(backbone, tmp_path):
    from tprl_ray.backbones.load import load_backbone
    from tprl_ray.config import BackboneConfig

    backbone.model.save_pretrained(tmp_path)
    backbone.processor.save_pretrained(tmp_path)
    loaded = load_backbone(BackboneConfig(path=str(tmp_path)))  # no tprl model card: a hub-style LLaVA-1.5
    assert loaded.prompt("what ?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nwhat ? ASSISTANT:"
    )
    assert load_backbone(BackboneConfig(path=str(tmp_path), prompt_format="chat_template")).prompt(
        "what ?"
    ) == backbone.prompt("what ?")
    # a 96x48 image is padded with the mean colour (0.5 -> 127) to 96x96 before the resize
    wide = Image.new("RGB", (96, 48), (255, 0, 0))
    square = Image.new("RGB", (96, 96), (127, 127, 127))
    square.paste(wide, (0, 24))
    torch.testing.assert_close(loaded.pixel_values([wide]), loaded.pixel_values([square]))
    unpadded = load_backbone(BackboneConfig(path=str(tmp_path), pad_to_square=False))
    assert not torch.allclose(unpadded.pixel_values([wide]), loaded.pixel_values([square]))
