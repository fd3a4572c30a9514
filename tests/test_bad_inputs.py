"""Bad input is refused with one line naming the culprit, from the driver, before Ray starts; where a
command is lenient by design (a question over the length cap) the question is rejected with its reason,
and the report records what it could not judge (capped budgets, words outside the vocabulary)."""

import json
import shutil

import pytest
import ray

from tprl_ray.cli import main
from tprl_ray.config import EMBEDDED_LFD, BackboneConfig
from tprl_ray.evaluation.config import EvalConfig
from tprl_ray.evaluation.engine import check_inputs


@pytest.fixture
def split(digits_dir, tmp_path):
    target = tmp_path / "test"
    shutil.copytree(digits_dir / "test", target)
    return target


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def refused(capsys, *args: str) -> str:
    """Run ``tprl eval`` on ``args``: exit status 2, one line on stderr, no traceback, no Ray started."""
    assert not ray.is_initialized()
    assert main(["eval", "--ray-address", "local", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not ray.is_initialized()
    assert err.startswith("tprl: error: ")
    return err.removeprefix("tprl: error: ")


@pytest.mark.parametrize(
    "budget, message",
    [
        ("1.5", "budget 1.5 is neither a kept fraction in (0, 1] nor a whole token count"),
        ("0", "budget 0.0 is neither"),
        ("65", "budget 65 is above the 64 visual tokens of"),
    ],
)
def test_budgets_that_are_no_fraction_or_token_count_or_exceed_the_model(capsys, split, tmp_path, budget, message):
    err = refused(capsys, "--data", str(split), "--budgets", budget, "--out", str(tmp_path / "r.json"))
    assert message in err
    assert not (tmp_path / "r.json").exists()


def test_pipeline_and_ppo_budgets_are_kept_fractions(capsys):
    assert main(["pipeline", "--budgets", "0.25,65"]) == 2
    assert main(["train", "ppo", "--budgets", "1.5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "tprl: error: PipelineConfig.budgets: budget 65.0 is not a kept fraction in (0, 1]",
        "tprl: error: PpoConfig.budgets: budget 1.5 is not a kept fraction in (0, 1]",
    ]


def test_data_errors_name_file_and_line(capsys, split, tmp_path):
    qpath = split / "questions.jsonl"
    original = qpath.read_bytes()
    rows = lines(qpath)
    out = ["--data", str(split), "--out", str(tmp_path / "r.json")]

    write_lines(qpath, [*rows[:2], {**rows[2], "category": "colour"}, *rows[3:]])
    assert refused(capsys, *out).startswith(f"{qpath}:3: unknown question category 'colour'")

    write_lines(qpath, [*rows, rows[4]])
    assert (
        refused(capsys, *out)
        == f"{qpath}:{len(rows) + 1}: duplicate question_id {rows[4]['question_id']!r} (first at line 5)"
    )

    qpath.write_bytes(b"")
    assert refused(capsys, *out) == f"{qpath}: no questions"

    qpath.write_bytes(original.replace(b"what", "wh\u00e0t".encode("latin-1"), 1))
    assert refused(capsys, *out).startswith(f"{qpath}:1: not UTF-8 (byte 0xe0")

    write_lines(qpath, [*rows[:5], {**rows[5], "text": "   "}, *rows[6:]])
    assert refused(capsys, *out) == f"{qpath}:6: question {rows[5]['question_id']} has an empty text"


def test_policy_directories_missing_incomplete_or_for_another_model(capsys, split, tmp_path):
    out = ["--data", str(split), "--out", str(tmp_path / "r.json"), "--pruners", "lfd"]
    missing = tmp_path / "missing"
    assert refused(capsys, *out, "--policies", f"lfd={missing}") == f"{missing}: autoencoder directory not found"
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(EMBEDDED_LFD / "policy.json", half)
    shutil.copy(EMBEDDED_LFD / "policy.safetensors", half)
    assert refused(capsys, *out, "--policies", f"lfd={half}") == (
        f"{half}: no autoencoder.json or autoencoder.safetensors (not a complete autoencoder export; train it first)"
    )
    shutil.copy(EMBEDDED_LFD / "autoencoder.json", half)
    (half / "autoencoder.safetensors").write_bytes(b"not weights")
    assert refused(capsys, *out, "--policies", f"lfd={half}").startswith(f"{half}: autoencoder export does not load")
    other = tmp_path / "other"  # a pruner trained on a model with 128-wide vision features
    shutil.copytree(EMBEDDED_LFD, other)
    _retrain_widths(other, d_v=128)
    assert refused(capsys, *out, "--policies", f"lfd={other}") == (
        f"lfd pruner of {other} was trained on 128-wide vision features and 128-wide embeddings; "
        "this model has 96 and 128"
    )


def _retrain_widths(directory, d_v: int) -> None:
    """Re-export ``directory``'s autoencoder with another input width (random weights)."""
    from tprl_ray.artifacts.export import export
    from tprl_ray.policy.autoencoder import TokenAutoencoder

    card = json.loads((directory / "autoencoder.json").read_text())
    module = TokenAutoencoder(**{**card["dims"], "d_v": d_v})
    export(module, module.state_dict(), directory, "autoencoder", {})


def test_an_unwritable_output_is_refused_before_the_evaluation(capsys, split, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = refused(capsys, "--data", str(split), "--out", str(blocker / "report.json"))
    assert err.startswith(f"{blocker}: output directory is not writable")


def test_every_question_over_the_length_cap_is_refused(capsys, split, tmp_path):
    err = refused(
        capsys, "--data", str(split), "--out", str(tmp_path / "r.json"), "--backbone.max-question-tokens", "3"
    )
    assert err.startswith(f"{split}: every question is rejected, e.g. question ") and "over the cap of 3" in err


def test_checks_report_long_questions_capped_budgets_and_unknown_words(split):
    """The driver's checks on their own (the run itself is in the next test)."""
    rows = lines(split / "questions.jsonl")
    rows[7]["text"] = " ".join(["what"] * 5000)
    rows[0]["text"] = rows[0]["text"].replace("what", "which")  # "which" is not a word of the tiny model
    write_lines(split / "questions.jsonl", rows)
    cfg = EvalConfig(data=split, budgets=[0.25, 65], cap_budgets=True, out=split.parent / "r.json")
    checked = check_inputs(cfg)
    assert [r.question_id for r in checked.rejects] == [rows[7]["question_id"]]
    assert "has 5000 tokens, over the cap of 120" in checked.rejects[0].reason
    assert len(checked.samples) == len(rows) - 1
    assert checked.effective == {65: 64}
    assert checked.vocabulary == {
        "test": {
            "questions": len(rows) - 1,
            "questions_with_unknown_words": 1,
            "unknown_words": 1,
            "examples": ["which"],
        }
    }
    default = BackboneConfig()
    assert (
        check_inputs(
            cfg.model_copy(update={"backbone": default.model_copy(update={"max_question_tokens": 6000})})
        ).rejects
        == []
    )


def test_a_lenient_run_records_rejects_effective_budgets_and_unknown_words(split, tmp_path, capsys):
    rows = lines(split / "questions.jsonl")[:12]
    rows[3]["text"] = " ".join(["what"] * 5000)
    rows[0]["text"] = rows[0]["text"].replace("what", "which")
    write_lines(split / "questions.jsonl", rows)
    out = tmp_path / "r.json"
    args = ["eval", "--data", str(split), "--out", str(out), "--budgets", "0.25,65", "--cap-budgets", "true"]
    try:
        assert main([*args, "--ray-address", "local", "--pool.cpus", "0.5", "--pool.batch-size", "8"]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert f"rejected: question {rows[3]['question_id']} has 5000 tokens" in printed
    assert "1 of 11 test question(s) hold 1 word(s) outside the model's vocabulary (e.g. which)" in printed
    report = json.loads(out.read_text())
    assert report["n"] == 11 and [r["question_id"] for r in report["rejects"]] == [rows[3]["question_id"]]
    assert report["vocabulary"]["test"]["unknown_words"] == 1
    capped = {r["label"]: r for r in report["rows"]}["random_65t"]
    assert capped["budget"] == 65 and capped["effective_budget"] == 64 and capped["avg_tokens"] == 64
    assert "effective_budget" not in {r["label"]: r for r in report["rows"]}["random_25"]
    predictions = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert rows[3]["question_id"] not in {p["question_id"] for p in predictions}


def test_the_pipeline_checks_every_split_before_its_first_stage(capsys, digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    qpath = data / "test" / "questions.jsonl"
    rows = lines(qpath)
    write_lines(qpath, [*rows[:2], {**rows[2], "category": "colour"}, *rows[3:]])
    out = tmp_path / "run"
    assert main(["pipeline", "--data", str(data), "--out", str(out), "--ray-address", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"tprl: error: {qpath}:3: unknown question category 'colour' (expected one of read, exist, count, where)"
    )
    assert not ray.is_initialized() and not (out / "precompute").exists()
    write_lines(qpath, rows)
    (data / "train" / "answers.jsonl").write_bytes(b"\xff\xfe\n")
    assert main(["pipeline", "--data", str(data), "--out", str(out), "--ray-address", "local"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tprl: error: {data / 'train' / 'answers.jsonl'}:1: not UTF-8 (byte 0xff at column 1)"
    )


def test_training_stages_check_their_paths_before_ray(capsys, precomputed, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data = ["--data", str(precomputed / "train"), "--val-data", str(precomputed / "val")]
    calls = {
        f"{blocker / 'ae'}: output directory is not writable": [
            "train",
            "autoencoder",
            *data,
            "--out",
            str(blocker / "ae"),
        ],
        f"{tmp_path / 'no-ae'}: autoencoder directory not found": [
            *["train", "lfd", *data, "--autoencoder", str(tmp_path / "no-ae"), "--out", str(tmp_path / "lfd")]
        ],
        f"{tmp_path / 'no-lfd'}: policy directory not found": [
            *["train", "ppo", *data, "--init", str(tmp_path / "no-lfd"), "--autoencoder", str(EMBEDDED_LFD)],
            *["--out", str(tmp_path / "ppo")],
        ],
    }
    for message, args in calls.items():
        assert main([*args, "--ray-address", "local"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"tprl: error: {message}") and len(err.splitlines()) == 1, err
        assert not ray.is_initialized()


def test_a_config_file_that_is_not_utf8_is_refused(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b'seed: 1\nout: "r\xe9"\n')
    assert main(["data", "digits", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"tprl: error: {config}: not UTF-8 (byte 0xe9 at offset 15)"
