import json

import numpy as np
from PIL import Image

from tprl_ray.data.digits import (
    CELL,
    CELL_NAMES,
    GRID,
    IMAGE_SIZE,
    DigitsConfig,
    SceneSampler,
    build_digits,
    load_digit_pools,
)
from tprl_ray.data.layout import read_split


def test_digit_pools_are_disjoint_and_cover_every_digit():
    pools = load_digit_pools(seed=0, test_fraction=0.3)
    train, test = (
        pools["train"][0].reshape(len(pools["train"][0]), -1),
        pools["test"][0].reshape(len(pools["test"][0]), -1),
    )
    assert len(train) + len(test) == 1797
    assert set(np.unique(pools["test"][1])) == set(range(10))
    train_rows = {row.tobytes() for row in train}
    # sklearn's digits hold a few byte-identical duplicates; almost no test image may appear in train.
    assert sum(row.tobytes() in train_rows for row in test) <= 3


def test_answers_follow_from_the_scene():
    sampler = SceneSampler(load_digit_pools(0, 0.3)["train"], np.random.default_rng(1))
    for _ in range(200):
        scene, questions = sampler.sample()
        labels = scene.labels
        counts = np.bincount(labels[labels >= 0], minlength=10)
        answers = {cat: (q, a) for cat, q, a in questions}
        q, a = answers["read"]
        assert str(labels[CELL_NAMES.index(q.split()[4])]) == a
        q, a = answers["exist"]
        assert (counts[int(q.split()[3])] > 0) == (a == "yes")
        q, a = answers["count"]
        assert counts[int(q.split()[2])] == int(a)
        q, a = answers["where"]
        digit = int(q.split()[3])
        assert counts[digit] == 1 and labels[CELL_NAMES.index(a)] == digit
        # an empty cell is dark, a digit cell is not
        for cell, label in enumerate(labels):
            r, c = divmod(cell, GRID)
            patch = scene.image[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
            assert (patch.max() > 120) == (label >= 0)


def test_build_is_deterministic_and_in_llava_layout(tmp_path):
    cfg = DigitsConfig(out=tmp_path / "a", seed=3, split_sizes={"train": 12, "test": 6})
    assert build_digits(cfg) == {"train": 48, "test": 24}
    build_digits(cfg.model_copy(update={"out": tmp_path / "b"}))
    for name in ("train/questions.jsonl", "train/answers.jsonl", "test/images/test_000005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    samples = read_split(tmp_path / "a" / "test")
    assert [s.category for s in samples[:4]] == ["read", "exist", "count", "where"]
    assert Image.open(tmp_path / "a" / "test" / "images" / samples[0].image).size == (IMAGE_SIZE, IMAGE_SIZE)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["questions"] == {"train": 48, "test": 24} and meta["config"]["seed"] == 3
    other = DigitsConfig(out=tmp_path / "c", seed=4, split_sizes={"train": 12, "test": 6})
    build_digits(other)
    assert (tmp_path / "c/train/questions.jsonl").read_bytes() != (tmp_path / "a/train/questions.jsonl").read_bytes()


def test_answers_are_balanced(tmp_path):
    build_digits(DigitsConfig(out=tmp_path, seed=0, split_sizes={"train": 400}))
    samples = read_split(tmp_path / "train", check_images=False)
    count = np.bincount([int(s.answer) for s in samples if s.category == "count"], minlength=4)
    exist_yes = np.mean([s.answer == "yes" for s in samples if s.category == "exist"])
    assert count.min() > 0.18 * 400 and 0.4 < exist_yes < 0.6


def test_each_question_records_the_cells_it_is_about(tmp_path):
    """read: the asked cell; exist, count, where: every cell holding the asked digit."""
    build_digits(DigitsConfig(out=tmp_path, seed=0, split_sizes={"train": 0, "val": 0, "test": 30}))
    for s in read_split(tmp_path / "test"):
        cells = s.extra["cells"]
        if s.category == "read":
            assert cells == [CELL_NAMES.index(s.text.split()[-2])]
        elif s.category == "where":
            assert cells == [CELL_NAMES.index(s.answer)]
        elif s.category == "count":
            assert len(cells) == int(s.answer)
        else:
            assert bool(cells) == (s.answer == "yes")
