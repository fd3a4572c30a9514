"""Smaller tiny models trained end to end with the real recipe, saved and reloaded like the hub's: a
LLaVA on 4x4 boards, a Qwen2.5-VL on the two-resolution boards."""

import json

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tprl_ray.backbones.llava import LlavaBackbone
from tprl_ray.backbones.load import load_backbone
from tprl_ray.data.layout import load_image, read_split
from tprl_ray.evaluation.predict import evaluate
from tprl_ray.models.config import TinyModelConfig
from tprl_ray.models.train_tiny import token_cells, train_tiny


def test_token_cells_follow_the_grid():
    cells = token_cells((8, 8), 4).reshape(8, 8)
    assert cells[0, 0] == cells[1, 1] == 0 and cells[0, 2] == 1 and cells[2, 0] == 4 and cells[7, 7] == 15
    six = token_cells((12, 12), 6).reshape(12, 12)  # a 6x6 board, 2x2 tokens per cell
    assert six[0, 2] == 1 and six[2, 0] == 6 and six[11, 11] == 35


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    cfg = TinyModelConfig.load(
        None,
        {
            "data": str(digits_dir),
            "out": str(out),
            "align_steps": 400,
            "tune_steps": 60,
            "batch_scenes": 8,
            "warmup": 10,
            "eval_every": 60,
            "val_questions": 40,
            "size": {
                "vision_hidden": 48,
                "vision_layers": 2,
                "text_hidden": 64,
                "text_layers": 2,
                "text_intermediate": 128,
            },
        },
    )
    history = []
    metrics = train_tiny(cfg, log=lambda m, step: history.append(dict(m)))
    return cfg, metrics, history


def test_both_stages_learn(trained):
    cfg, metrics, history = trained
    align = [h["train/align_loss"] for h in history]
    answer = [h["train/answer_loss"] for h in history[cfg.align_steps :]]
    assert len(history) == cfg.align_steps + cfg.tune_steps
    assert sum(align[-10:]) / 10 < 0.6 * sum(align[:10]) / 10
    assert sum(answer[-10:]) / 10 < 0.8 * sum(answer[:3]) / 3
    assert "val/accuracy" in metrics and set(metrics) >= {"val/read", "val/exist", "val/count", "val/where"}


def test_checkpoint_loads_like_a_hub_llava(trained, digits_dir):
    cfg, metrics, _ = trained
    model = LlavaForConditionalGeneration.from_pretrained(cfg.out)
    processor = AutoProcessor.from_pretrained(cfg.out)
    assert model.config.vision_config.hidden_size == 48
    assert processor.tokenizer.convert_tokens_to_ids("c2") != processor.tokenizer.unk_token_id
    card = json.loads((cfg.out / "tprl_model_card.json").read_text())
    assert card["benchmark"]["seed"] == 0 and card["recipe"]["align_steps"] == 400
    backbone = load_backbone(cfg.out)
    assert card["prompt_format"] == "chat_template" and backbone.prompt("is there a 7 ?").startswith("USER:")
    val = read_split(digits_dir / "val")[:40]
    assert evaluate(backbone, digits_dir / "val", val)["accuracy"] == pytest.approx(metrics["val/accuracy"])
    assert not list(cfg.out.parent.glob(".*tmp"))


def test_conversation_targets_are_the_replies_and_key_words():
    import numpy as np
    import torch

    from tprl_ray.data.digits import SceneSampler, load_digit_pools
    from tprl_ray.models.tiny_llava import TinyLlavaSize, build_model, build_processor
    from tprl_ray.models.train_tiny import conversation, conversation_rows

    size = TinyLlavaSize(vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=1, text_intermediate=64)
    processor = build_processor(size)
    backbone = LlavaBackbone(build_model(size, processor.tokenizer), processor)
    sampler = SceneSampler(load_digit_pools(0, 0.3)["train"], np.random.default_rng(0))
    scene, questions = sampler.sample()
    talk = conversation(sampler, scene, questions, rounds=2)
    assert len({q for q, _ in talk}) == len(talk) >= 4
    for at_key_word in (False, True):
        row = conversation_rows(backbone, [torch.zeros(64, 32)], [(8, 8)], [talk], at_key_word)[0]
        before, after, targets = row.before, row.after, row.targets
        assert before == processor.tokenizer("USER :")["input_ids"]
        names = [
            (processor.tokenizer.convert_ids_to_tokens(after[p]), processor.tokenizer.convert_ids_to_tokens(t))
            for p, t in targets
        ]
        expected = []
        for q, a in talk:
            expected += [(":", a), (a, "</s>")] + (
                [(q.split()[-2] if "many" not in q else q.split()[2], a)] if at_key_word else []
            )
        assert names == expected


def test_a_tiny_qwen_trains_on_two_board_sizes_and_loads_like_a_hub_qwen(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tprl_ray.backbones.qwen import QwenBackbone
    from tprl_ray.data.config import DigitsConfig
    from tprl_ray.data.digits import build_digits

    data = tmp_path / "boards"
    build_digits(DigitsConfig(out=data, split_sizes={"train": 4, "val": 10, "test": 2}, boards=[4, 6]))
    size = {"vision_hidden": 32, "vision_depth": 2, "text_hidden": 32, "text_layers": 2, "text_intermediate": 64}
    cfg = TinyModelConfig.load(
        None,
        {
            "family": "qwen",
            "data": str(data),
            "out": str(tmp_path / "qwen"),
            "align_steps": 30,
            "tune_steps": 10,
            "batch_scenes": 4,
            "warmup": 2,
            "key_word_steps": 5,
            "eval_every": 10,
            "val_questions": 40,
            "qwen_size": size,
            "position_layers": [1],
        },
    )
    history = []
    metrics = train_tiny(cfg, log=lambda m, step: history.append(dict(m)))
    align = [h["train/align_loss"] for h in history]
    assert sum(align[-5:]) / 5 < 0.7 * sum(align[:5]) / 5 and "val/where" in metrics
    assert all(h["train/position_loss"] > 0 for h in history[cfg.align_steps :])  # the cell-name loss ran
    with pytest.raises(ValueError, match="position_layers must be below"):
        TinyModelConfig(family="qwen", position_layers=[1, 2], qwen_size=size)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.out)
    assert model.config.text_config.rope_parameters["mrope_section"] == [1] * 4  # interleaved, head_dim 8
    backbone = load_backbone(cfg.out)
    assert (
        isinstance(backbone, QwenBackbone)
        and backbone.tokenizer.convert_tokens_to_ids("e5") != backbone.tokenizer.unk_token_id
    )
    val = read_split(data / "val")[:40]
    assert {s.extra["board"] for s in val} == {4, 6}
    grids = {tuple(g) for g in backbone.encode([load_image(data / "val", s.image) for s in val[::4]]).grids}
    assert grids == {(8, 8), (12, 12)}
    assert evaluate(backbone, data / "val", val)["accuracy"] == pytest.approx(metrics["val/accuracy"])
    card = json.loads((cfg.out / "tprl_model_card.json").read_text())
    assert card["benchmark"]["boards"] == [4, 6] and card["recipe"]["family"] == "qwen"


def test_the_logit_lens_loss_lets_a_token_name_its_cell_and_its_digit_at_once():
    import numpy as np
    import torch

    from tprl_ray.backbones.qwen import QwenBackbone
    from tprl_ray.data.digits import cell_names
    from tprl_ray.models import tiny_qwen
    from tprl_ray.models.train_tiny import AlignmentHead

    tokenizer = tiny_qwen.build_tokenizer()
    backbone = QwenBackbone(tiny_qwen.build_model(tokenizer), tokenizer, tiny_qwen.build_image_processor())
    head = AlignmentHead(backbone, cells=False)
    four, six = np.full(16, -1), np.full(36, -1)
    four[[0, 5]], six[[7, 35]] = [3, 9], [0, 4]
    grids, labels = [(4, 4), (6, 6)], [four, six]  # one token per cell: 16 + 36 tokens
    cells, digits = head.targets(grids, labels)
    occupied = [0, 5, 16 + 7, 16 + 35]
    assert [str(int(digits[r])) for r in occupied] == ["3", "9", "0", "4"] and (digits == 10).sum() == 48
    ids = tokenizer.convert_tokens_to_ids
    logits = torch.zeros(52, len(tokenizer))
    for row in range(52):
        side = 4 if row < 16 else 6
        logits[row, ids(cell_names(side)[int(cells[row])])] = 30.0  # names its cell ...
        logits[row, ids(str(int(digits[row])) if digits[row] < 10 else "none")] = 30.0  # ... and its digit at once
    assert head.lens_loss(logits, grids, labels).item() < 1e-6
    assert [cell_names(6)[int(cells[r])] for r in occupied[2:]] == ["b2", "f6"]  # a 6x6 board's own names
    wrong = logits.clone()
    wrong[occupied[0], ids("3")], wrong[occupied[0], ids("8")] = 0.0, 30.0  # one token names another digit
    assert head.lens_loss(wrong, grids, labels).item() == pytest.approx(30.0 / 52, rel=1e-3)


def test_the_shipped_tiny_qwen_answers_both_board_sizes_of_the_held_out_digits(tmp_path):
    from tprl_ray.config import EMBEDDED_QWEN
    from tprl_ray.data.config import DigitsConfig
    from tprl_ray.data.digits import build_digits

    data = tmp_path / "digits"
    build_digits(DigitsConfig(out=data, seed=0, split_sizes={"train": 4, "val": 4, "test": 60}, boards=[4, 6]))
    card = json.loads((EMBEDDED_QWEN / "tprl_model_card.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    assert card["benchmark"]["boards"] == [4, 6]
    assert card["benchmark"]["test_pool_fingerprint"] == meta["test_pool_fingerprint"]  # never saw these digits
    samples = read_split(data / "test")
    backbone = load_backbone("embedded-qwen")
    result = evaluate(backbone, data / "test", samples)
    assert result["accuracy"] >= 0.90 and min(result["per_type"].values()) >= 0.75, result
    assert {load_image(data / "test", s.image).size for s in samples} == {(96, 96), (144, 144)}  # both sides
