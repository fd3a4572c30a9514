"""`tprl viz`: the pruning steps of a learned pruner, drawn on the image."""

import json

import numpy as np
import pytest
from PIL import Image

from tprl_ray.cli import main
from tprl_ray.evaluation.trajectory import DIM, SHADE, dimmed


def test_dimmed_leaves_kept_cells_and_shades_dropped_ones():
    image = Image.fromarray(np.full((4, 6, 3), 200, np.uint8))
    out = dimmed(image, [0, 5], (2, 3)).astype(float)  # a 2 x 3 grid of 2 x 2 cells; keep the corners
    assert (out[:2, :2] == 200).all() and (out[2:, 4:] == 200).all()
    shaded = np.round(DIM * 200 + (1 - DIM) * np.array(SHADE))
    assert (out[:2, 2:4] == shaded).all() and (out[2:, :2] == shaded).all()


def test_viz_writes_one_figure_per_question_with_nested_steps(digits_dir, tmp_path, capsys):
    out = tmp_path / "viz"
    split = digits_dir / "test"
    assert main(["viz", "--data", str(split), "--out", str(out), "--count", "4", "--budgets", "0.111,0.5,0.25"]) == 0
    records = json.loads((out / "trajectories.json").read_text())
    assert [r["question_id"].rsplit("-", 1)[1] for r in records] == ["read", "exist", "count", "where"]
    for record in records:
        steps = record["steps"]
        assert [len(s["kept"]) for s in steps] == [64, 32, 16, 7]  # T = 0 and the budgets, descending
        for before, after in zip(steps, steps[1:]):
            assert set(after["kept"]) < set(before["kept"])
        assert all(np.isfinite(s["answer_logp"]) and isinstance(s["prediction"], str) for s in steps)
        with Image.open(out / f"{record['question_id']}.png") as figure:
            assert figure.width > 3 * figure.height  # four panels side by side
    named = records[2]["question_id"]
    assert main(["viz", "--data", str(split), "--out", str(out / "one"), "--questions", named]) == 0
    assert [r["question_id"] for r in json.loads((out / "one" / "trajectories.json").read_text())] == [named]
    capsys.readouterr()
    assert main(["viz", "--data", str(split), "--out", str(out), "--questions", "nope"]) == 2
    assert capsys.readouterr().err.strip() == f"tprl: error: {split}: no question(s) nope"


@pytest.mark.parametrize("budgets", ["1.5", "0.25,64"])
def test_viz_budgets_are_fractions(budgets, capsys):
    assert main(["viz", "--budgets", budgets]) == 2
    assert "is not a kept fraction in (0, 1]" in capsys.readouterr().err
