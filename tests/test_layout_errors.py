"""Bad benchmark input fails with one line naming the file (and line)."""

import shutil
import subprocess
import sys

import pytest

from tprl_ray.data.config import CATEGORIES
from tprl_ray.data.layout import DataError, read_split


@pytest.fixture
def split(digits_dir, tmp_path):
    target = tmp_path / "test"
    shutil.copytree(digits_dir / "test", target)
    return target


def _error(split_dir) -> str:
    with pytest.raises(DataError) as info:
        read_split(split_dir, categories=CATEGORIES)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    assert _error(tmp_path / "nope") == f"{tmp_path / 'nope'}: data directory not found"


def test_malformed_jsonl(split):
    lines = (split / "questions.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-3]
    (split / "questions.jsonl").write_text("\n".join(lines) + "\n")
    assert _error(split).startswith(f"{split / 'questions.jsonl'}:7: malformed JSON")


def test_unknown_category(split):
    text = (split / "questions.jsonl").read_text().replace('"category": "count"', '"category": "colour"', 1)
    (split / "questions.jsonl").write_text(text)
    message = _error(split)
    assert message.startswith(f"{split / 'questions.jsonl'}:3: unknown question category 'colour'")


def test_missing_and_corrupt_image(split):
    (split / "images" / "test_000001.png").unlink()
    assert _error(split) == (f"{split / 'questions.jsonl'}:5: image {split / 'images' / 'test_000001.png'} not found")
    (split / "images" / "test_000001.png").write_bytes(b"\x89PNG not really")
    message = _error(split)
    assert message.startswith(f"{split / 'questions.jsonl'}:5: image {split / 'images' / 'test_000001.png'} is corrupt")


def test_question_without_answer(split):
    lines = (split / "answers.jsonl").read_text().splitlines()
    (split / "answers.jsonl").write_text("\n".join(lines[1:]) + "\n")
    assert "question test-000000-read has no answer" in _error(split)


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tprl_ray.cli", "model", "tiny", "--data", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1] == f"tprl: error: {tmp_path / 'missing' / 'meta.json'}: not found; "
        "build the benchmark with `tprl data digits` first"
    )


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "tprl_ray.cli", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    for command in ("data", "model", "pipeline", "precompute", "train", "eval"):
        assert command in out
    sub = subprocess.run(
        [sys.executable, "-m", "tprl_ray.cli", "data", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "digits" in sub


def test_benchmark_fields_and_answer_lists_are_kept(split):
    """MMBench-style extra fields and VQAv2-style answer lists survive reading."""
    import json

    questions = [json.loads(x) for x in (split / "questions.jsonl").read_text().splitlines()]
    questions[0] |= {"index": 7, "options": {"A": "3", "B": "5"}}
    (split / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = [json.loads(x) for x in (split / "answers.jsonl").read_text().splitlines()]
    answers[0]["answer"] = ["two", "2", "2"]
    (split / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    first, second = read_split(split)[:2]
    cells = first.extra.pop("cells")  # the digits benchmark's own fields
    assert first.extra.pop("board") == 4
    assert first.extra == {"index": 7, "options": {"A": "3", "B": "5"}} and first.answer == ["two", "2", "2"]
    assert isinstance(cells, list) and set(second.extra) == {"cells", "board"} and isinstance(second.answer, str)
