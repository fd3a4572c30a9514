"""The LLaVA adapter against the stock transformers forward, on a tiny random LLaVA."""

import pytest
import torch
from PIL import Image

from tprl_ray.backbones.llava import BackboneError, LlavaBackbone
from tprl_ray.data.layout import load_image, read_split
from tprl_ray.models.tiny_llava import TinyLlavaSize, build_model, build_processor

SIZE = TinyLlavaSize(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2,
                     text_heads=2, text_intermediate=64)


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
    features = backbone.image_features(backbone.pixel_values(images))
    logp, _ = backbone.score([s.text for s in samples], [s.answer for s in samples], features)
    for i, s in enumerate(samples):
        text = backbone.prompt(s.text) + " " + s.answer
        enc = backbone.processor(images=[images[i]], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits = backbone.model(**enc).logits[0]
        answer_tok = backbone.answer_ids(s.text, s.answer)[:-1]
        rows = torch.log_softmax(logits[-len(answer_tok) - 1:-1], -1)
        expected = rows.gather(1, torch.tensor(answer_tok)[:, None]).mean()
        assert logp[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_mixed_keep_counts_match_one_by_one(backbone, batch):
    samples, images = batch
    features = backbone.image_features(backbone.pixel_values(images))
    n = features.shape[1]
    gen = torch.Generator().manual_seed(0)
    keep = [torch.randperm(n, generator=gen)[: k] for k in (1, 5, 16, 33, 64, 20)]
    qs, ans = [s.text for s in samples], [s.answer for s in samples]
    logp, correct = backbone.score(qs, ans, features, keep)
    texts = backbone.generate(qs, features, keep)
    for i in range(len(samples)):
        lp, c = backbone.score(qs[i:i + 1], ans[i:i + 1], features[i:i + 1], keep[i:i + 1])
        assert logp[i].item() == pytest.approx(lp.item(), abs=1e-4) and correct[i] == c[0]
        assert texts[i] == backbone.generate(qs[i:i + 1], features[i:i + 1], keep[i:i + 1])[0]


def test_keep_order_does_not_matter_raster_order_is_used(backbone, batch):
    samples, images = batch
    features = backbone.image_features(backbone.pixel_values(images[:1]))
    keep = torch.tensor([40, 3, 17, 8])
    a, _ = backbone.score([samples[0].text], [samples[0].answer], features, [keep])
    b, _ = backbone.score([samples[0].text], [samples[0].answer], features, [torch.sort(keep).values])
    assert a.item() == b.item()


def test_generate_matches_stock_generate(backbone, batch):
    samples, images = batch
    features = backbone.image_features(backbone.pixel_values(images))
    ours = backbone.generate([s.text for s in samples], features, max_new_tokens=4)
    for i, s in enumerate(samples):
        enc = backbone.processor(images=[images[i]], text=[backbone.prompt(s.text)], return_tensors="pt")
        out = backbone.model.generate(**enc, max_new_tokens=4, do_sample=False)
        stock = backbone.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert ours[i] == stock.strip()


def test_empty_keep_set_is_refused(backbone, batch):
    samples, images = batch
    features = backbone.image_features(backbone.pixel_values(images[:1]))
    with pytest.raises(BackboneError, match="at least one visual token"):
        backbone.score([samples[0].text], [samples[0].answer], features, [torch.tensor([], dtype=torch.long)])


def test_loading_a_non_llava_path_fails_clearly(tmp_path):
    with pytest.raises(BackboneError, match="not a loadable model checkpoint"):
        LlavaBackbone.from_pretrained(tmp_path)
