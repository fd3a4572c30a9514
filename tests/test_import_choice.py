"""`tprl data import` of the multiple-choice benchmarks (MMBench, SEED-Bench, ScienceQA) from small inputs in
the real formats of both sources: LLaVA's evaluation files and lmms-lab's Parquet in the Hugging Face hub cache.
Each split is read back record by record and known predictions are scored through it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tprl_ray.data.config import ImportConfig
from tprl_ray.data.importers import seed as seed_importer
from tprl_ray.data.importers.run import run_import
from tprl_ray.data.layout import DataError, read_split
from tprl_ray.evaluation.metrics import score_benchmark

DIRECTLY = "Answer with the option's letter from the given choices directly."
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how `datasets` stores an Image feature
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def picture(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def cell(data: bytes | None, path: str = "image.png") -> dict | None:
    return None if data is None else {"bytes": data, "path": path}


def hub_parquet(root: Path, repo: str, folder: str, split: str, table: pa.Table) -> Path:
    """``root/datasets--lmms-lab--<repo>``, with ``table`` as ``<folder>/<split>-00000-of-00001.parquet``."""
    cache = root / f"datasets--lmms-lab--{repo}"
    path = cache / "snapshots" / SNAPSHOT / folder / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return cache


def run(benchmark: str, src: Path, out: Path, **kw) -> dict:
    return run_import(ImportConfig(benchmark=benchmark, src=src, out=out, **kw), progress=False)


def split_of(out: Path) -> dict:
    return {s.question_id: s for s in read_split(out)}


def score(benchmark: str, samples: dict, predictions: dict[str, str]) -> dict:
    records = [
        {"question_id": q, "category": s.category, "answer": s.answer, "prediction": predictions[q], **s.extra}
        for q, s in samples.items()
    ]
    return score_benchmark(benchmark, records)


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- MMBench

TSV_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
TSV_HEADER += ["l2-category", "comment", "split"]
RED, GREEN, BLUE = picture((255, 0, 0)), picture((0, 255, 0), "JPEG"), picture((0, 0, 255))


def tsv_row(index, question, hint, options, answer, category, image) -> list[str]:
    options = list(options) + [""] * (4 - len(options))
    return [str(index), question, hint, *options, answer, category, image, "src", "l2-" + category, "nan", "dev"]


def write_tsv(path: Path, rows: list[list[str]], header: list[str] = TSV_HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in [header, *rows]), encoding="utf-8")
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def circular_rows() -> list[list[str]]:
    """Three questions with their CircularEval passes, as mmbench_dev_20230712.tsv holds them."""
    scene = ["cat", "dog", "bird", "fish"]
    rows = [
        tsv_row(r * 1_000_000, "What is shown?", "", scene[r:] + scene[:r], "BADC"[r], "image_scene", b64(RED))
        for r in range(4)
    ]
    sign = ["stop", "go", "wait"]
    rows += [
        tsv_row(
            r * 1_000_000 + 1,
            "What does the sign say?",
            "The sign reads STOP.",
            sign[r:] + sign[:r],
            "ACB"[r],
            "ocr",
            b64(GREEN),
        )
        for r in range(3)
    ]
    rows.append(tsv_row(2, "Is it day?", "nan", ["yes", "no", "nan", "nan"], "B", "image_scene", b64(BLUE)))
    rows.append(tsv_row(1_000_002, "Is it day?", "nan", ["no", "yes"], "A", "image_scene", "2"))  # image of index 2
    return rows


def test_mmbench_llava_circular_file(tmp_path):
    src = tmp_path / "mmbench"
    write_tsv(src / "mmbench_dev_20230712.tsv", circular_rows())
    out = tmp_path / "out"
    summary = run("mmbench", src, out)
    assert summary == {"imported": 9, "images": 3, "rejected_missing_image": 0}
    samples = split_of(out)
    assert list(samples) == ["0", "1000000", "2000000", "3000000", "1", "1000001", "2000001", "2", "1000002"]
    first = samples["0"]
    assert first.text == f"What is shown?\nA. cat\nB. dog\nC. bird\nD. fish\n{DIRECTLY}"
    assert (first.category, first.answer, first.image) == ("image_scene", "B", "0.png")
    assert first.extra == {
        "index": 0,
        "round": 0,
        "options": {"A": "cat", "B": "dog", "C": "bird", "D": "fish"},
        "hint": None,
        "l2_category": "l2-image_scene",
    }
    sign = samples["1000001"]
    assert sign.text == f"The sign reads STOP.\nWhat does the sign say?\nA. go\nB. wait\nC. stop\n{DIRECTLY}"
    assert (sign.answer, sign.image, sign.extra["index"], sign.extra["round"]) == ("C", "1.jpg", 1, 1)
    assert (
        sign.extra["options"] == {"A": "go", "B": "wait", "C": "stop"} and sign.extra["hint"] == "The sign reads STOP."
    )
    day = samples["1000002"]
    assert day.text == f"Is it day?\nA. no\nB. yes\n{DIRECTLY}"  # "nan" hint and options are missing
    assert (day.answer, day.image, day.extra["index"]) == ("A", "2.png", 2)
    assert [s.image for s in samples.values()].count("0.png") == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0.png", "1.jpg", "2.png"]
    assert (out / "images" / "1.jpg").read_bytes() == GREEN
    assert rejects(out) == []

    predictions = {"0": "B", "1000000": "A", "2000000": "D. dog", "3000000": "C"}  # right in every pass
    predictions |= {"1": "A", "1000001": "C", "2000001": "A"}  # wrong in the last pass
    predictions |= {"2": "B", "1000002": "no"}  # right (the option's text)
    result = score("mmbench", samples, predictions)
    assert result["score"] == pytest.approx(2 / 3)
    assert result["per_category"] == {"image_scene": 1.0, "ocr": 0.0}
    assert (result["n"], result["n_questions"]) == (9, 3)

    assert run("mmbench", src, out)["skipped"] is True  # the same settings again: nothing to do


def test_mmbench_llava_rotates_a_file_without_passes(tmp_path):
    rows = [
        tsv_row(0, "Which?", "", ["a", "b", "c", "d"], "C", "cat1", b64(RED)),
        tsv_row(5, "Yes?", "Look.", ["yes", "no"], "A", "cat2", b64(BLUE)),
    ]
    tsv = write_tsv(tmp_path / "plain.tsv", rows)
    out = tmp_path / "out"
    assert run("mmbench", tsv, out) == {"imported": 6, "images": 2, "rejected_missing_image": 0}
    samples = split_of(out)
    assert list(samples) == ["0-0", "0-1", "0-2", "0-3", "5-0", "5-1"]
    assert [samples[f"0-{r}"].answer for r in range(4)] == ["C", "B", "A", "D"]
    assert samples["0-1"].text == f"Which?\nA. b\nB. c\nC. d\nD. a\n{DIRECTLY}"
    assert samples["0-1"].extra["options"] == {"A": "b", "B": "c", "C": "d", "D": "a"}
    assert [samples[f"5-{r}"].answer for r in range(2)] == ["A", "B"]
    assert samples["5-1"].text == f"Look.\nYes?\nA. no\nB. yes\n{DIRECTLY}"
    assert {s.extra["index"] for s in samples.values()} == {0, 5}
    result = score("mmbench", samples, {"0-0": "C", "0-1": "B", "0-2": "A", "0-3": "D", "5-0": "A", "5-1": "A"})
    assert result["score"] == 0.5 and result["per_category"] == {"cat1": 1.0, "cat2": 0.0}


def test_mmbench_llava_malformed_and_test_split(tmp_path):
    rows = circular_rows()
    rows[1][TSV_HEADER.index("image")] = "not*base64!"
    tsv = write_tsv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", rows)
    with pytest.raises(DataError) as exc:
        run("mmbench", tsv.parent, tmp_path / "strict")
    assert one_line(exc).startswith(f"{tsv}:3: the image is not valid base64")
    out = tmp_path / "lenient"
    assert run("mmbench", tsv.parent, out, lenient=True) == {
        "imported": 8,
        "images": 3,
        "rejected_missing_image": 0,
        "rejected_malformed": 1,
    }
    [reject] = rejects(out)
    assert (reject["question_id"], reject["where"], reject["reason"]) == ("1000000", f"{tsv}:3", "malformed")

    test_rows = [[c for i, c in enumerate(r) if TSV_HEADER[i] != "answer"] for r in circular_rows()]
    header = [c for c in TSV_HEADER if c != "answer"]
    test_tsv = write_tsv(tmp_path / "mmbench" / "mmbench_test_20230712.tsv", test_rows, header)
    with pytest.raises(DataError, match="no answer column") as exc:
        run("mmbench", tmp_path / "mmbench", tmp_path / "test", split="test")
    assert one_line(exc).startswith(str(test_tsv))


def mmbench_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [(c, pa.string()) for c in ("index", "question", "hint", "A", "B", "C", "D", "answer", "category")]
        + [("image", IMAGE)]
        + [(c, pa.string()) for c in ("source", "L2-category", "comment", "split")]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def mmbench_rows() -> list[dict]:
    def row(index, options, answer, category, image, hint=None):
        options = list(options) + [None] * (4 - len(options))
        cols = dict(zip("ABCD", options))
        return {
            "index": str(index),
            "question": "Q?",
            "hint": hint,
            **cols,
            "answer": answer,
            "category": category,
            "image": cell(image),
            "source": "s",
            "L2-category": "L2",
            "comment": None,
            "split": "dev",
        }

    pair = ["up", "down"]
    trio = ["one", "two", "three"]
    return [row(r * 1_000_000, pair[r:] + pair[:r], "AB"[r], "attr", RED) for r in range(2)] + [
        row(r * 1_000_000 + 7, trio[r:] + trio[:r], "BAC"[r], "count", GREEN, "Count.") for r in range(3)
    ]


def test_mmbench_lmms(tmp_path):
    cache = hub_parquet(tmp_path, "MMBench", "en", "dev", mmbench_table(mmbench_rows()))
    out = tmp_path / "out"
    assert run("mmbench", cache, out) == {"imported": 5, "images": 2, "rejected_missing_image": 0}
    samples = split_of(out)
    assert list(samples) == ["0", "1000000", "7", "1000007", "2000007"]
    assert samples["1000000"].text == f"Q?\nA. down\nB. up\n{DIRECTLY}"
    assert samples["2000007"].text == f"Count.\nQ?\nA. three\nB. one\nC. two\n{DIRECTLY}"
    assert samples["2000007"].extra == {
        "index": 7,
        "round": 2,
        "options": {"A": "three", "B": "one", "C": "two"},
        "hint": "Count.",
        "l2_category": "L2",
    }
    assert (samples["2000007"].answer, samples["2000007"].image) == ("C", "7.jpg")
    predictions = {"0": "A", "1000000": "B", "7": "B", "1000007": "A", "2000007": "A"}  # question 7 wrong once
    result = score("mmbench", samples, predictions)
    assert result["score"] == 0.5 and result["per_category"] == {"attr": 1.0, "count": 0.0}

    bad = mmbench_rows()
    bad[1]["answer"] = "C"  # only A and B
    cache = hub_parquet(tmp_path / "bad", "MMBench", "en", "dev", mmbench_table(bad))
    parquet = next(cache.rglob("*.parquet"))
    with pytest.raises(DataError) as exc:
        run("mmbench", cache, tmp_path / "strict")
    assert one_line(exc) == f"{parquet}: row 1: answer 'C' is not one of the options A, B"
    out = tmp_path / "lenient"
    assert run("mmbench", cache, out, lenient=True)["rejected_malformed"] == 1
    assert rejects(out)[0]["where"] == f"{parquet}: row 1"

    unanswered = [{**r, "answer": None} for r in mmbench_rows()]
    cache = hub_parquet(tmp_path / "test", "MMBench", "en", "test", mmbench_table(unanswered))
    with pytest.raises(DataError, match="has no answer .*import the dev split") as exc:
        run("mmbench", cache, tmp_path / "test-out", split="test")
    one_line(exc)


# ----------------------------------------------------------------------------- SEED-Bench


def seed_question(qid, question_type_id, answer, data_type, data_id, **extra) -> dict:
    return {
        "answer": answer,
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "data_id": data_id,
        "data_type": data_type,
        "question": f"Question {qid}?",
        "question_id": qid,
        "question_type_id": question_type_id,
        **extra,
    }


SEED_QUESTIONS = [
    seed_question("101669", 5, "A", "image", "1454426_2591111986"),
    seed_question("101670", 1, "C", "image", "1454426_2591111986"),
    seed_question("v1738", 10, "B", "video", "94328.webm"),
    seed_question("v1962", 11, "D", "video", "P03/P03_24.MP4", segment=[648.0, 658.0]),
]


def seed_text(qid: str) -> str:
    return f"Question {qid}?\nA. One\nB. Two\nC. Three\nD. Four\n{DIRECTLY}"


def llava_seed(root: Path, lines: list[str] | None = None, questions: list[dict] = SEED_QUESTIONS) -> Path:
    src = root / "seed_bench"
    (src / "SEED-Bench-image").mkdir(parents=True)
    (src / "SEED-Bench-video-image").mkdir()
    (src / "SEED-Bench-image" / "1454426_2591111986").write_bytes(GREEN)  # CC3M names have no suffix
    (src / "SEED-Bench-video-image" / "10_v1738.png").write_bytes(RED)  # the middle frame; v1962's is missing
    types = {name: i for i, name in seed_importer.QUESTION_TYPES.items()}
    (src / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": types}))
    if lines is None:
        images = ["SEED-Bench-image/1454426_2591111986"] * 2
        images += ["SEED-Bench-video-image/10_v1738.png", "SEED-Bench-video-image/11_v1962.png"]
        ids = [101669, 101670, "v1738", "v1962"]
        cats = ["Instances Counting", "Scene Understanding", "Action Recognition", "Action Prediction"]
        lines = [
            json.dumps({"image": i, "text": seed_text(str(q)), "category": c, "question_id": q})
            for i, q, c in zip(images, ids, cats)
        ]
    (src / "llava-seed-bench.jsonl").write_text("\n".join(lines) + "\n")
    return src


def test_seed_llava(tmp_path):
    src = llava_seed(tmp_path)
    out = tmp_path / "out"
    assert run("seed", src, out) == {"imported": 3, "images": 2, "rejected_missing_image": 1}
    samples = split_of(out)
    assert list(samples) == ["101669", "101670", "v1738"]
    first = samples["101669"]
    assert (first.text, first.category, first.answer) == (seed_text("101669"), "Instances Counting", "A")
    assert first.extra == {
        "options": {"A": "One", "B": "Two", "C": "Three", "D": "Four"},
        "data_type": "image",
        "question_type_id": 5,
    }
    assert samples["101670"].image == first.image and first.image.endswith(".jpg")  # one file for both
    video = samples["v1738"]
    assert (video.category, video.answer, video.extra["data_type"]) == ("Action Recognition", "B", "video")
    assert (out / "images" / video.image).read_bytes() == RED
    [reject] = rejects(out)
    assert (reject["question_id"], reject["reason"]) == ("v1962", "missing_image")
    result = score("seed", samples, {"101669": "A", "101670": "B", "v1738": "B"})
    assert result["score"] == pytest.approx(2 / 3)
    expected = {"Action Recognition": 1.0, "Instances Counting": 1.0, "Scene Understanding": 0.0}
    assert result["per_category"] == expected


def test_seed_llava_malformed(tmp_path):
    questions = [dict(q) for q in SEED_QUESTIONS]
    questions[1]["answer"] = "E"
    good = json.dumps(
        {"image": "SEED-Bench-image/1454426_2591111986", "text": seed_text("101669"), "question_id": 101669}
    )
    other = json.dumps(
        {"image": "SEED-Bench-image/1454426_2591111986", "text": seed_text("101670"), "question_id": 101670}
    )
    src = llava_seed(tmp_path, [good, '{"image": "SEED-Bench-image/x", "text":', other], questions)
    jsonl = src / "llava-seed-bench.jsonl"
    with pytest.raises(DataError) as exc:
        run("seed", src, tmp_path / "strict")
    assert one_line(exc).startswith(f"{jsonl}:2: malformed JSON")
    out = tmp_path / "lenient"
    assert run("seed", src, out, lenient=True) == {
        "imported": 1,
        "images": 1,
        "rejected_missing_image": 0,
        "rejected_malformed": 2,
    }
    bad_line, bad_answer = rejects(out)
    assert (bad_line["where"], bad_line["reason"]) == (f"{jsonl}:2", "malformed")
    assert bad_answer["where"] == f"{src / 'SEED-Bench.json'}: question '101670'"
    assert "answer 'E' is not one of the options" in bad_answer["detail"]


def seed_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [(c, pa.string()) for c in ("answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_id")]
        + [("data_type", pa.string()), ("question", pa.string()), ("question_id", pa.string())]
        + [("question_type_id", pa.int16()), ("image", pa.list_(IMAGE))]
    )
    return pa.Table.from_pylist(rows, schema=schema)


FRAMES = [picture((30 * i, 0, 0)) for i in range(8)]


def seed_rows() -> list[dict]:
    return [
        {**seed_question("101669", 5, "A", "image", "1454426_2591111986"), "image": [cell(GREEN)]},
        {
            **seed_question("v1738", 10, "B", "video", "94328.webm"),
            "image": [cell(f, f"{i}.png") for i, f in enumerate(FRAMES)],
        },
        {**seed_question("v9999", 12, "C", "video", "P06/cam01/P06_cereals.avi"), "image": []},
    ]


def test_seed_lmms(tmp_path):
    cache = hub_parquet(tmp_path, "SEED-Bench", "data", "test", seed_table(seed_rows()))
    out = tmp_path / "out"
    assert run("seed", cache, out) == {"imported": 2, "images": 2, "rejected_missing_image": 0, "rejected_no_image": 1}
    samples = split_of(out)
    assert list(samples) == ["101669", "v1738"]
    assert samples["101669"].text == seed_text("101669")
    assert (samples["v1738"].category, samples["v1738"].extra["question_type_id"]) == ("Action Recognition", 10)
    assert (out / "images" / samples["v1738"].image).read_bytes() == FRAMES[3]  # the middle of 8 frames
    assert (out / "images" / samples["101669"].image).read_bytes() == GREEN
    assert rejects(out)[0]["question_id"] == "v9999"
    result = score("seed", samples, {"101669": "A", "v1738": "C"})
    assert result["score"] == 0.5

    bad = seed_rows()
    bad[1]["choice_b"] = None
    cache = hub_parquet(tmp_path / "bad", "SEED-Bench", "data", "test", seed_table(bad))
    parquet = next(cache.rglob("*.parquet"))
    with pytest.raises(DataError) as exc:
        run("seed", cache, tmp_path / "strict")
    assert one_line(exc) == f"{parquet}: row 1: missing field(s) choice_b"
    out = tmp_path / "lenient"
    assert run("seed", cache, out, lenient=True)["rejected_malformed"] == 1
    assert rejects(out)[0] == {
        "question_id": "v1738",
        "where": f"{parquet}: row 1",
        "reason": "malformed",
        "detail": "missing field(s) choice_b",
    }


# ----------------------------------------------------------------------------- ScienceQA


def problem(question, choices, answer, hint, image, subject, split, **extra) -> dict:
    return {
        "question": question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "image": image,
        "task": "closed choice",
        "grade": extra.get("grade", "grade4"),
        "subject": subject,
        "topic": extra.get("topic", "topic"),
        "category": "Category",
        "skill": "Skill",
        "lecture": "",
        "solution": "",
        "split": split,
    }


SPEECH = "Which figure of speech is used in this text?\nSing, O goddess, the anger of Achilles son of Peleus."
GORDON = ["if the spacecraft was damaged", "how steady a parachute was", "whether a parachute would swing"]
COLONY = ["Maryland", "New Hampshire", "Rhode Island", "Vermont"]


def problems() -> dict:
    return {
        "1": problem("Train?", ["a", "b"], 0, "", "image.png", "natural science", "train"),
        "4": problem(SPEECH, ["chiasmus", "apostrophe"], 1, "", None, "language science", "test"),
        "5": problem(
            "Which of the following could Gordon's test show?",
            GORDON,
            1,
            "People can use the engineering-design  process.",
            "image.png",
            "natural science",
            "test",
            grade="grade8",
            topic="science-and-engineering-practices",
        ),
        "11": problem("What is the name of the colony shown?", COLONY, 1, "", "image.png", "social science", "test"),
        "12": problem("Missing?", ["x", "y"], 0, "Look.", "image.png", "natural science", "test"),
        "7": problem("Val?", ["p", "q", "r"], 2, "", "image.png", "natural science", "val"),
    }


def llava_scienceqa(root: Path, probs: dict | None = None) -> Path:
    src = root / "scienceqa"
    for split, pid, color in (("test", "5", (9, 9, 9)), ("test", "11", (99, 9, 9)), ("val", "7", (9, 99, 9))):
        (src / "images" / split / pid).mkdir(parents=True)
        (src / "images" / split / pid / "image.png").write_bytes(picture(color))
    (src / "problems.json").write_text(json.dumps(problems() if probs is None else probs))
    pid_splits = {"train": ["1"], "val": ["7"], "test": ["4", "5", "11", "12"], "trainval": ["1", "7"]}
    pid_splits |= {"minitrain": ["1"], "minival": ["7"], "minitest": ["5"]}
    (src / "pid_splits.json").write_text(json.dumps(pid_splits))
    return src


def test_scienceqa_llava(tmp_path):
    src = llava_scienceqa(tmp_path)
    out = tmp_path / "out"
    summary = run("scienceqa", src, out)
    assert summary == {"imported": 2, "images": 2, "rejected_missing_image": 1, "rejected_no_image": 1}
    samples = split_of(out)
    assert list(samples) == ["5", "11"]
    gordon = samples["5"]
    assert gordon.text == (
        "Context: People can use the engineering-design process.\n"
        "Question: Which of the following could Gordon's test show?\n"
        "Options: (A) if the spacecraft was damaged (B) how steady a parachute was "
        f"(C) whether a parachute would swing\n{DIRECTLY}"
    )
    assert (gordon.category, gordon.answer) == ("natural science", "B")
    assert gordon.extra == {
        "options": dict(zip("ABC", GORDON)),
        "hint": "People can use the engineering-design  process.",
        "grade": "grade8",
        "topic": "science-and-engineering-practices",
    }
    colony = samples["11"]
    assert colony.text == (
        "Context: N/A\nQuestion: What is the name of the colony shown?\n"
        f"Options: (A) Maryland (B) New Hampshire (C) Rhode Island (D) Vermont\n{DIRECTLY}"
    )
    assert (out / "images" / colony.image).read_bytes() == (src / "images/test/11/image.png").read_bytes()
    assert {(r["question_id"], r["reason"]) for r in rejects(out)} == {("4", "no_image"), ("12", "missing_image")}
    result = score("scienceqa", samples, {"5": "B", "11": "The answer is A."})
    assert result["score"] == 0.5 and result["per_category"] == {"natural science": 1.0, "social science": 0.0}

    minival = tmp_path / "minival"
    assert run("scienceqa", src, minival, split="minival") == {"imported": 1, "images": 1, "rejected_missing_image": 0}
    assert split_of(minival)["7"].answer == "C"  # its image comes from images/val


def test_scienceqa_llava_malformed(tmp_path):
    probs = problems()
    probs["5"]["answer"] = 9
    src = llava_scienceqa(tmp_path, probs)
    with pytest.raises(DataError) as exc:
        run("scienceqa", src, tmp_path / "strict")
    where = f"{src / 'problems.json'}: problem '5'"
    assert one_line(exc) == f"{where}: answer 9 is not the index of one of the 3 choices"
    out = tmp_path / "lenient"
    assert run("scienceqa", src, out, lenient=True)["rejected_malformed"] == 1
    assert [r for r in rejects(out) if r["reason"] == "malformed"][0]["where"] == where

    (src / "problems.json").write_text("{not json")
    with pytest.raises(DataError, match="problems.json: malformed JSON") as exc:
        run("scienceqa", src, tmp_path / "unreadable")
    one_line(exc)


def scienceqa_table(rows: list[dict]) -> pa.Table:
    text = ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
    schema = pa.schema(
        [("image", IMAGE), ("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int8())]
        + [(c, pa.string()) for c in text]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def scienceqa_rows() -> list[dict]:
    keep = ("question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category", "skill")
    probs = problems()
    rows = []
    for pid, image in (("4", None), ("5", picture((1, 2, 3))), ("11", picture((3, 2, 1)))):
        p = probs[pid]
        rows.append({"image": cell(image), **{k: p[k] for k in keep}, "lecture": "", "solution": ""})
    return rows


def test_scienceqa_lmms(tmp_path):
    table = scienceqa_table(scienceqa_rows())
    cache = hub_parquet(tmp_path, "ScienceQA", "ScienceQA-FULL", "test", table)
    hub_parquet(tmp_path, "ScienceQA", "ScienceQA-IMG", "test", table.slice(1))
    out = tmp_path / "out"
    assert run("scienceqa", cache, out) == {
        "imported": 2,
        "images": 2,
        "rejected_missing_image": 0,
        "rejected_no_image": 1,
    }
    samples = split_of(out)
    assert list(samples) == ["full-test-1", "full-test-2"]
    assert samples["full-test-2"].text.startswith("Context: N/A\nQuestion: What is the name of the colony shown?\n")
    assert samples["full-test-1"].extra["options"] == dict(zip("ABC", GORDON))
    assert rejects(out)[0]["question_id"] == "full-test-0"
    result = score("scienceqa", samples, {"full-test-1": "B", "full-test-2": "A"})
    assert result["score"] == 0.5

    rows = scienceqa_rows()
    rows[1]["answer"] = 5
    cache = hub_parquet(tmp_path / "bad", "ScienceQA", "ScienceQA-IMG", "validation", scienceqa_table(rows))
    parquet = next(cache.rglob("*.parquet"))
    with pytest.raises(DataError) as exc:
        run("scienceqa", cache, tmp_path / "strict", split="validation")
    assert one_line(exc) == f"{parquet}: row 1: answer 5 is not the index of one of the 3 choices"
    out = tmp_path / "lenient"
    summary = run("scienceqa", cache, out, split="validation", lenient=True)
    assert summary == {
        "imported": 1,
        "images": 1,
        "rejected_missing_image": 0,
        "rejected_malformed": 1,
        "rejected_no_image": 1,
    }
    assert split_of(out).keys() == {"img-validation-2"}
