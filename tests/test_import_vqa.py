"""`tprl data import` for GQA, VQAv2, POPE and MME, each from LLaVA's files and from lmms-lab's Parquet.

Every source is built small under tmp_path in its real format (hub-cache layout and ``{bytes, path}``
image cells for Parquet), imported, read back record by record and scored with known predictions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tprl_ray.cli import main
from tprl_ray.data.config import ImportConfig
from tprl_ray.data.importers import mme
from tprl_ray.data.importers.run import run_import
from tprl_ray.data.layout import DataError, read_split
from tprl_ray.evaluation.metrics import MME_SUBTASKS, score_benchmark

SUFFIX = "\nAnswer the question using a single word or phrase."
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how `datasets` stores an Image feature


def image_bytes(color: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, color: tuple[int, int, int], fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color, fmt))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def hub(root: Path, name: str, tables: dict[str, pa.Table], row_group_size: int | None = None) -> Path:
    """A Hugging Face hub-cache dataset folder (``datasets--lmms-lab--<name>``) holding ``tables``."""
    repo = root / f"datasets--lmms-lab--{name}"
    for relpath, table in tables.items():
        path = repo / "snapshots" / SNAPSHOT / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo


def cell(data: bytes | None, path: str = "image.jpg") -> dict:
    return {"bytes": data, "path": path}


def imported(benchmark: str, src: Path, out: Path, **kw) -> dict:
    return run_import(ImportConfig(benchmark=benchmark, src=src, out=out, **kw), progress=False)


def scored(benchmark: str, split_dir: Path, predictions: dict[str, str]) -> dict:
    """Score ``predictions`` on an imported split, the records built as the evaluation engine builds them."""
    samples = read_split(split_dir)
    records = [
        {
            **s.extra,
            "question_id": s.question_id,
            "image": s.image,
            "category": s.category,
            "answer": s.answer,
            "prediction": predictions[s.question_id],
        }
        for s in samples
    ]
    return score_benchmark(benchmark, records)


def rejects(split_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (split_dir / "rejects.jsonl").read_text().splitlines()]


def image_files(split_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(split_dir / "images")) for p in (split_dir / "images").rglob("*") if p.is_file())


def one_line_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# ----------------------------------------------------------------------------- GQA


def gqa_entry(question: str, image: str, answer: str, structural: str, semantic: str, detailed: str) -> dict:
    return {
        "semantic": [{"operation": "select", "dependencies": [], "argument": "table (1)"}],
        "entailed": [],
        "equivalent": [],
        "question": question,
        "imageId": image,
        "isBalanced": True,
        "groups": {"global": None, "local": "10c-table_color"},
        "answer": answer,
        "semanticStr": "select: table (1)",
        "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
        "types": {"detailed": detailed, "semantic": semantic, "structural": structural},
        "fullAnswer": f"The answer is {answer}.",
    }


GQA = {
    "201307251": gqa_entry("Is it overcast?", "n161313", "yes", "verify", "attr", "weatherVerify"),
    "201640614": gqa_entry("Who is wearing the dress?", "n161313", "woman", "query", "rel", "relS"),
    "20602803": gqa_entry("Is the ground blue or brown?", "n168412", "brown", "choose", "attr", "chooseAttr"),
    "2062325": gqa_entry("Is the surfer wearing a wetsuit?", "n179136", "no", "verify", "rel", "relVerify"),
}
GQA_PREDICTIONS = {"201307251": "Yes.", "201640614": "man", "20602803": "Brown"}  # 2 of the 3 imported right


def test_gqa_llava(tmp_path):
    src = tmp_path / "gqa"
    lines = [
        {"question_id": q, "image": f"{e['imageId']}.jpg", "text": e["question"] + SUFFIX, "category": "default"}
        for q, e in GQA.items()
    ]
    write_jsonl(src / "llava_gqa_testdev_balanced.jsonl", lines)
    write_json(
        src / "data" / "testdev_balanced_questions.json", {**GQA, "999": gqa_entry("?", "n1", "x", "query", "", "")}
    )
    write_image(src / "data" / "images" / "n161313.jpg", (200, 0, 0))
    write_image(src / "data" / "images" / "n168412.jpg", (0, 200, 0))  # n179136.jpg is missing
    out = tmp_path / "out"
    summary = imported("gqa", src, out)
    assert summary == {"imported": 3, "images": 2, "rejected_missing_image": 1}
    samples = read_split(out)
    assert [s.question_id for s in samples] == ["201307251", "201640614", "20602803"]
    assert [s.text for s in samples] == [GQA[s.question_id]["question"] + SUFFIX for s in samples]
    assert [s.category for s in samples] == ["verify", "query", "choose"]
    assert [s.answer for s in samples] == ["yes", "woman", "brown"]
    assert [s.image for s in samples] == ["n161313.jpg", "n161313.jpg", "n168412.jpg"]
    assert samples[1].extra == {"semantic": "rel", "detailed": "relS", "full_answer": "The answer is woman."}
    assert image_files(out) == ["n161313.jpg", "n168412.jpg"]
    assert [r["question_id"] for r in rejects(out)] == ["2062325"]
    assert scored("gqa", out, GQA_PREDICTIONS)["score"] == pytest.approx(2 / 3)

    # train/val come from GQA's question file alone, the prompt built as LLaVA's.
    write_json(src / "data" / "val_balanced_questions.json", {"201307251": GQA["201307251"]})
    imported("gqa", src, tmp_path / "val", split="val")
    (sample,) = read_split(tmp_path / "val")
    assert (sample.text, sample.category, sample.image) == ("Is it overcast?" + SUFFIX, "verify", "n161313.jpg")

    # A malformed line names the file and line; lenient, it is rejected as malformed.
    write_jsonl(src / "llava_gqa_testdev_balanced.jsonl", [lines[0], '{"question_id": "201640614", "image"', lines[2]])
    with pytest.raises(DataError) as excinfo:
        imported("gqa", src, tmp_path / "bad")
    one_line_error(excinfo, "llava_gqa_testdev_balanced.jsonl:2", "malformed JSON")
    assert imported("gqa", src, tmp_path / "lenient", lenient=True)["rejected_malformed"] == 1
    assert rejects(tmp_path / "lenient")[0]["reason"] == "malformed"
    # A question the official file does not have cannot be answered.
    write_jsonl(src / "llava_gqa_testdev_balanced.jsonl", [{**lines[0], "question_id": "404"}])
    with pytest.raises(DataError) as excinfo:
        imported("gqa", src, tmp_path / "unknown")
    one_line_error(excinfo, "llava_gqa_testdev_balanced.jsonl:1", "question 404 is not in")


def gqa_instructions(entries: dict) -> pa.Table:
    rows = [
        {"id": q, **{k: v for k, v in e.items() if k not in ("semantic", "annotations")}} for q, e in entries.items()
    ]
    return pa.Table.from_pylist(rows)


def test_gqa_lmms(tmp_path):
    entries = {**GQA, "2062325": {**GQA["2062325"], "imageId": "n000001"}}  # an image id in no images file
    images = pa.Table.from_pylist(
        [
            {"id": "n999999", "image": cell(image_bytes((9, 9, 9)))},
            {"id": "n168412", "image": cell(image_bytes((0, 200, 0)))},
            {"id": "n161313", "image": cell(image_bytes((200, 0, 0)))},
        ],
        schema=pa.schema([("id", pa.string()), ("image", IMAGE)]),
    )
    src = hub(
        tmp_path,
        "GQA",
        {
            "testdev_balanced_instructions/testdev-00000-of-00001.parquet": gqa_instructions(entries),
            "testdev_balanced_images/testdev-00000-of-00001.parquet": images,
            "testdev_all_images/testdev-00000-of-00001.parquet": images.slice(0, 1),  # another config
        },
        row_group_size=2,  # the images span two row groups
    )
    out = tmp_path / "out"
    summary = imported("gqa", src, out)
    assert summary == {"imported": 3, "images": 2, "rejected_missing_image": 1}
    samples = read_split(out)
    assert [(s.question_id, s.category, s.answer, s.image) for s in samples] == [
        ("201307251", "verify", "yes", "n161313.jpg"),
        ("201640614", "query", "woman", "n161313.jpg"),
        ("20602803", "choose", "brown", "n168412.jpg"),
    ]
    assert [s.text for s in samples] == [GQA[s.question_id]["question"] + SUFFIX for s in samples]
    assert samples[2].extra == {"semantic": "attr", "detailed": "chooseAttr", "full_answer": "The answer is brown."}
    assert image_files(out) == ["n161313.jpg", "n168412.jpg"]
    with Image.open(out / "images" / "n168412.jpg") as img:
        assert img.convert("RGB").getpixel((4, 4))[1] > 150  # the image joined by id, not by position
    assert scored("gqa", out, GQA_PREDICTIONS)["score"] == pytest.approx(2 / 3)

    broken = {**entries, "201640614": {**entries["201640614"], "answer": None}}
    path = src / "snapshots" / SNAPSHOT / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet"
    pq.write_table(gqa_instructions(broken), path)
    with pytest.raises(DataError) as excinfo:
        imported("gqa", src, tmp_path / "bad")
    one_line_error(excinfo, f"{path}: row 1", "missing field(s) answer")
    assert imported("gqa", src, tmp_path / "lenient", lenient=True)["rejected_malformed"] == 1
    assert rejects(tmp_path / "lenient")[0] | {"detail": ""} == {
        "question_id": "201640614",
        "where": f"{path}: row 1",
        "reason": "malformed",
        "detail": "",
    }


# ----------------------------------------------------------------------------- VQAv2


def vqa_answers(values: list[str]) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(values, 1)]


VQA = [  # question_id, image_id, question, answer_type, question_type, the ten answers, the prediction
    (421, 42, "What color is the bus?", "other", "what color is", ["red"] * 3 + ["blue"] * 7, "Red"),
    (422, 42, "Is it raining?", "yes/no", "is it", ["yes"] * 10, "yes"),
    (731, 73, "How many dogs?", "number", "how many", ["2"] * 10, "three"),
    (991, 99, "What is this?", "other", "what is this", ["cat"] * 10, "cat"),
]
VQA_SCORE = (0.9 + 1 + 0) / 3  # 3 of 10 humans: 7 leave-one-out subsets count 1, 3 count 2/3


def vqa_annotation(qid, image_id, answer_type, question_type, answers) -> dict:
    most = max(set(answers), key=answers.count)
    return {
        "question_id": qid,
        "image_id": image_id,
        "question_type": question_type,
        "answer_type": answer_type,
        "multiple_choice_answer": most,
        "answers": vqa_answers(answers),
    }


def test_vqav2_llava(tmp_path):
    src = tmp_path / "vqav2"
    header = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014"}
    questions = [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, *_ in VQA]
    write_json(
        src / "v2_OpenEnded_mscoco_val2014_questions.json",
        {**header, "task_type": "Open-Ended", "questions": questions},
    )
    annotations = [vqa_annotation(qid, i, at, qt, ans) for qid, i, _, at, qt, ans, _ in VQA]
    write_json(src / "v2_mscoco_val2014_annotations.json", {**header, "annotations": annotations})
    write_image(src / "val2014" / "COCO_val2014_000000000042.jpg", (1, 2, 3))
    write_image(src / "val2014" / "COCO_val2014_000000000073.jpg", (3, 2, 1))  # 99's image is missing
    out = tmp_path / "out"
    assert imported("vqav2", src, out) == {"imported": 3, "images": 2, "rejected_missing_image": 1}
    samples = read_split(out)
    assert [s.question_id for s in samples] == ["421", "422", "731"]
    assert [s.text for s in samples] == [q + SUFFIX for _, _, q, *_ in VQA[:3]]
    assert [s.category for s in samples] == ["other", "yes/no", "number"]
    assert [s.answer for s in samples] == [row[5] for row in VQA[:3]]
    assert [len(s.answer) for s in samples] == [10, 10, 10]
    assert samples[0].extra == {"question_type": "what color is", "multiple_choice_answer": "blue"}
    assert [s.image for s in samples] == ["COCO_val2014_000000000042.jpg"] * 2 + ["COCO_val2014_000000000073.jpg"]
    assert image_files(out) == ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"]
    assert scored("vqav2", out, {str(r[0]): r[6] for r in VQA})["score"] == pytest.approx(VQA_SCORE)

    del annotations[1]["answers"]
    write_json(src / "v2_mscoco_val2014_annotations.json", {**header, "annotations": annotations})
    with pytest.raises(DataError) as excinfo:
        imported("vqav2", src, tmp_path / "bad")
    one_line_error(excinfo, "v2_OpenEnded_mscoco_val2014_questions.json: question 1", "missing field(s) answers")
    assert imported("vqav2", src, tmp_path / "lenient", lenient=True)["rejected_malformed"] == 1
    assert [(r["question_id"], r["reason"]) for r in rejects(tmp_path / "lenient")][0] == ("422", "malformed")
    (src / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": [')
    with pytest.raises(DataError) as excinfo:
        imported("vqav2", src, tmp_path / "unreadable")
    one_line_error(excinfo, "v2_mscoco_val2014_annotations.json: malformed JSON at line 1")


VQA_SCHEMA = pa.schema(
    [
        ("question_type", pa.string()),
        ("multiple_choice_answer", pa.string()),
        (
            "answers",
            pa.list_(
                pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
            ),
        ),
        ("image_id", pa.int64()),
        ("answer_type", pa.string()),
        ("question_id", pa.int64()),
        ("question", pa.string()),
        ("image", IMAGE),
    ]
)


def vqa_rows(rows=VQA) -> pa.Table:
    colors = {42: (1, 2, 3), 73: (3, 2, 1), 99: (9, 9, 9)}
    table = []
    for qid, image_id, question, answer_type, question_type, answers, _ in rows:
        annotation = vqa_annotation(qid, image_id, answer_type, question_type, answers)
        data = image_bytes(colors[image_id]) if image_id != 99 else b"not an image"
        table.append({**annotation, "question": question, "image": cell(data, f"{image_id}.jpg")})
    return pa.Table.from_pylist(table, schema=VQA_SCHEMA)


def test_vqav2_lmms(tmp_path):
    src = hub(tmp_path, "VQAv2", {"data/validation-00000-of-00001.parquet": vqa_rows()})
    out = tmp_path / "out"
    assert imported("vqav2", src, out) == {
        "imported": 3,
        "images": 2,
        "rejected_missing_image": 0,
        "rejected_corrupt_image": 1,
    }
    samples = read_split(out)
    assert [(s.question_id, s.category, s.text) for s in samples] == [
        (str(q), at, text + SUFFIX) for q, _, text, at, *_ in VQA[:3]
    ]
    assert [s.answer for s in samples] == [row[5] for row in VQA[:3]]
    assert samples[2].extra == {"question_type": "how many", "multiple_choice_answer": "2"}
    assert image_files(out) == ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"]
    assert scored("vqav2", out, {str(r[0]): r[6] for r in VQA})["score"] == pytest.approx(VQA_SCORE)
    with pytest.raises(DataError, match="unknown split 'testdev'"):  # no answers: cannot be scored
        imported("vqav2", src, tmp_path / "testdev", split="testdev")

    table = vqa_rows().to_pylist()
    table[2]["answers"] = None  # a test-split row: no answers
    path = src / "snapshots" / SNAPSHOT / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=VQA_SCHEMA), path)
    with pytest.raises(DataError) as excinfo:
        imported("vqav2", src, tmp_path / "bad")
    one_line_error(excinfo, f"{path}: row 2", "missing field(s) answers")
    assert imported("vqav2", src, tmp_path / "lenient", lenient=True)["rejected_malformed"] == 1
    assert rejects(tmp_path / "lenient")[0]["reason"] == "malformed"


# ----------------------------------------------------------------------------- POPE

POPE_IMAGES = ("COCO_val2014_000000310196.jpg", "COCO_val2014_000000210789.jpg")
# (LLaVA's id, category, image, question, label, prediction), in LLaVA's order: adversarial, random, popular.
POPE = [
    (1, "adversarial", POPE_IMAGES[0], "Is there a snowboard in the image?", "yes", "Yes"),
    (2, "adversarial", POPE_IMAGES[1], "Is there a backpack in the image?", "no", "No"),
    (10000001, "random", POPE_IMAGES[0], "Is there a snowboard in the image?", "yes", "Yes, there is."),
    (10000002, "random", POPE_IMAGES[1], "Is there a car in the image?", "no", "Yes"),
    (20000001, "popular", POPE_IMAGES[1], "Is there a person in the image?", "yes", "No, there is not."),
    (20000002, "popular", "COCO_val2014_000000429109.jpg", "Is there a dining table in the image?", "no", "No"),
]
POPE_F1 = {"adversarial": 1.0, "random": 2 / 3, "popular": 0.0}  # popular's one question: a false no


def pope_llava(src: Path, rows=POPE) -> None:
    write_jsonl(
        src / "llava_pope_test.jsonl",
        [{"question_id": q, "image": i, "text": t + SUFFIX, "category": c} for q, c, i, t, *_ in rows],
    )
    for category in ("adversarial", "popular", "random"):
        labels = [
            {"question_id": n, "image": i, "text": t, "label": lab}  # POPE numbers each file from 1
            for n, (_, _, i, t, lab, _) in enumerate((r for r in rows if r[1] == category), 1)
        ]
        write_jsonl(src / "coco" / f"coco_pope_{category}.json", labels)
    for name, color in zip(POPE_IMAGES, ((10, 20, 30), (30, 20, 10))):
        write_image(src / "val2014" / name, color)  # 429109 is missing


def test_pope_llava(tmp_path):
    src, out = tmp_path / "pope", tmp_path / "out"
    pope_llava(src)
    summary = imported("pope", src, out)
    assert summary == {"imported": 5, "images": 2, "rejected_missing_image": 1}
    assert imported("pope", src, out) == {**summary, "skipped": True}  # the same settings again: nothing to do
    samples = read_split(out)
    assert [s.question_id for s in samples] == [str(r[0]) for r in POPE[:5]]
    assert [s.text for s in samples] == [r[3] + SUFFIX for r in POPE[:5]]
    assert [s.category for s in samples] == [r[1] for r in POPE[:5]]
    assert [s.answer for s in samples] == [r[4] for r in POPE[:5]]
    assert [s.image for s in samples] == [r[2] for r in POPE[:5]]
    assert image_files(out) == sorted(POPE_IMAGES)
    result = scored("pope", out, {str(r[0]): r[5] for r in POPE})
    assert result["per_category"] == pytest.approx(POPE_F1)
    assert result["score"] == pytest.approx(5 / 9)

    imported("pope", src, tmp_path / "random", split="random")
    assert [s.question_id for s in read_split(tmp_path / "random")] == ["10000001", "10000002"]

    # The link is by order: a label file in another order does not match, and says so.
    labels = (src / "coco" / "coco_pope_random.json").read_text().splitlines()
    (src / "coco" / "coco_pope_random.json").write_text("\n".join(labels[::-1]) + "\n")
    with pytest.raises(DataError) as excinfo:
        imported("pope", src, tmp_path / "bad")
    one_line_error(excinfo, "llava_pope_test.jsonl:3", "coco_pope_random.json:1", "does not match", "e3e3926")
    # The stopped import wrote the images before the bad line. Run again on the same out with --lenient:
    # allowed (it never finished), and those images are kept, not written again.
    written = {p.name: p.stat().st_ino for p in (tmp_path / "bad" / "images").iterdir()}
    assert written and json.loads((tmp_path / "bad" / "import.json").read_text())["summary"] is None
    assert imported("pope", src, tmp_path / "bad", lenient=True)["rejected_malformed"] == 2
    assert {n: (tmp_path / "bad" / "images" / n).stat().st_ino for n in written} == written
    assert {r["reason"] for r in rejects(tmp_path / "bad")} == {"malformed", "missing_image"}
    with pytest.raises(ValueError, match="other lenient"):  # a finished import is not redone with other settings
        imported("pope", src, tmp_path / "bad")
    # A label file with more lines than the questions of its split cannot be linked either.
    (src / "coco" / "coco_pope_random.json").write_text("\n".join([*labels, labels[0]]) + "\n")
    with pytest.raises(DataError) as excinfo:
        imported("pope", src, tmp_path / "extra")
    one_line_error(excinfo, "coco_pope_random.json: last 1 line(s)", "no random question")


def test_pope_cli(tmp_path):
    src, out = tmp_path / "pope", tmp_path / "out"
    pope_llava(src)
    assert main(["data", "import", "pope", "--src", str(src), "--out", str(out), "--split", "adversarial"]) == 0
    assert [s.question_id for s in read_split(out)] == ["1", "2"]


POPE_SCHEMA = pa.schema(
    [(k, pa.string()) for k in ("id", "question_id", "question", "answer", "image_source")]
    + [("image", IMAGE), ("category", pa.string())]
)


def pope_rows(rows=POPE) -> pa.Table:
    table, colors = [], {POPE_IMAGES[0]: (10, 20, 30), POPE_IMAGES[1]: (30, 20, 10)}
    numbers: dict[str, int] = {}
    for i, (_, category, image, question, label, _) in enumerate(rows):
        numbers[category] = numbers.get(category, 0) + 1
        data = image_bytes(colors.get(image, (0, 0, 0)))
        table.append(
            {
                "id": str(i),
                "question_id": str(numbers[category]),
                "question": question,
                "answer": label,
                "image_source": image.removesuffix(".jpg"),
                "image": cell(data),
                "category": category,
            }
        )
    return pa.Table.from_pylist(table, schema=POPE_SCHEMA)


def test_pope_lmms(tmp_path):
    src = hub(tmp_path, "POPE", {"data/test-00000-of-00001.parquet": pope_rows()})
    out = tmp_path / "out"
    assert imported("pope", src, out) == {"imported": 6, "images": 3, "rejected_missing_image": 0}
    samples = read_split(out)
    assert [s.question_id for s in samples] == [
        "adversarial/1",
        "adversarial/2",
        "random/1",
        "random/2",
        "popular/1",
        "popular/2",
    ]
    assert [(s.text, s.category, s.answer, s.image) for s in samples] == [
        (r[3] + SUFFIX, r[1], r[4], r[2]) for r in POPE
    ]
    assert image_files(out) == sorted([*POPE_IMAGES, POPE[5][2]])  # each written once though every row has it
    predictions = {s.question_id: r[5] for s, r in zip(samples, POPE)}
    predictions["popular/2"] = "Yes"  # popular: a false no and a false yes
    assert scored("pope", out, predictions)["score"] == pytest.approx(5 / 9)
    imported("pope", src, tmp_path / "popular", split="popular")  # no Full config here: filtered by category
    assert [s.question_id for s in read_split(tmp_path / "popular")] == ["popular/1", "popular/2"]

    table = pope_rows().to_pylist()
    table[3]["answer"] = "maybe"
    path = src / "snapshots" / SNAPSHOT / "data" / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=POPE_SCHEMA), path)
    with pytest.raises(DataError) as excinfo:
        imported("pope", src, tmp_path / "bad")
    one_line_error(excinfo, f"{path}: row 3", "'maybe' is not yes or no")
    assert imported("pope", src, tmp_path / "lenient", lenient=True)["rejected_malformed"] == 1
    assert rejects(tmp_path / "lenient")[0]["question_id"] == "random/2"


# ----------------------------------------------------------------------------- MME

# subtask, file, (question, answer) x 2, the two predictions
MME = [
    (
        "artwork",
        "10002.jpg",
        ("Is this artwork created by courbet, gustave? Please answer yes or no.", "Yes"),
        ("Is this artwork created by milani, aureliano? Please answer yes or no.", "No"),
        ("Yes", "No"),
    ),
    (
        "OCR",
        "0001.jpg",
        ('Is the word in the logo "cold drinks"? Please answer yes or no.', "Yes"),
        ('Is the word in the logo "cold rinks"? Please answer yes or no.', "No"),
        ("No", "Yes"),
    ),
    (
        "code_reasoning",
        "0020.png",
        ("Is a python code shown in the picture? Please answer yes or no.", "Yes"),
        ("Is a c++ code shown in the picture?  Please answer yes or no.", "No"),
        ("Yes", "Yes"),
    ),
]
# acc + acc+ per subtask: both right 100 + 100; one of two 50 + 0; none 0.
MME_SCORES = {"artwork": 200.0, "code_reasoning": 50.0, "OCR": 0.0}


def mme_predictions() -> dict[str, str]:
    return {f"{s}/{f}#{k}": p[k - 1] for s, f, *_, p in MME for k in (1, 2)}


def check_mme(out: Path) -> None:
    samples = read_split(out)
    assert [s.question_id for s in samples] == [f"{s}/{f}#{k}" for s, f, *_ in MME for k in (1, 2)]
    assert [s.category for s in samples] == [s for s, *_ in MME for _ in (1, 2)]
    assert [s.answer for s in samples] == [a for *_, q1, q2, _ in MME for _, a in (q1, q2)]
    assert [s.image for s in samples] == [f"{s}/{f}" for s, f, *_ in MME for _ in (1, 2)]
    assert samples[0].text == "Is this artwork created by courbet, gustave?" + SUFFIX  # as LLaVA's llava_mme.jsonl
    assert samples[5].text == "Is a c++ code shown in the picture?" + SUFFIX
    assert samples[0].extra == {}
    assert image_files(out) == ["OCR/0001.jpg", "artwork/10002.jpg", "code_reasoning/0020.png"]
    result = scored("mme", out, mme_predictions())
    assert result["per_category"] == pytest.approx(MME_SCORES)
    assert (result["perception"], result["cognition"]) == pytest.approx((200.0, 50.0))


def test_mme_llava(tmp_path):
    assert set(mme.SUBTASKS) == {name for names in MME_SUBTASKS.values() for name in names}
    root = tmp_path / "MME" / "MME_Benchmark_release_version"
    colors = iter([(1, 1, 1), (2, 2, 2), (3, 3, 3)])
    for subtask, name, q1, q2, _ in MME:
        stem, fmt = Path(name).stem, "PNG" if name.endswith(".png") else "JPEG"
        folder = root / subtask
        if subtask == "artwork":  # images/ + questions_answers_YN/; the others side by side
            write_image(folder / "images" / name, next(colors), fmt)
            qa = folder / "questions_answers_YN"
        else:
            write_image(folder / name, next(colors), fmt)
            qa = folder
        qa.mkdir(parents=True, exist_ok=True)
        (qa / f"{stem}.txt").write_text(f"{q1[0]}\t{q1[1]}\n{q2[0]}\t{q2[1]}\n")
    missing = root / "artwork" / "questions_answers_YN" / "10003.txt"  # its image is not there
    missing.write_text(
        "Is this artwork titled sorrow? Please answer yes or no.\tNo\n"
        "Is this artwork titled night? Please answer yes or no.\tYes\n"
    )
    (root / "eval_tool").mkdir()  # not a subtask: ignored
    out = tmp_path / "out"
    assert imported("mme", tmp_path / "MME", out) == {"imported": 6, "images": 3, "rejected_missing_image": 2}
    check_mme(out)

    txt = root / "code_reasoning" / "0020.txt"
    txt.write_text("Is a python code shown in the picture? Please answer yes or no. Yes\nIs a c++ code shown?\tNo\n")
    with pytest.raises(DataError) as excinfo:
        imported("mme", tmp_path / "MME", tmp_path / "bad")
    one_line_error(excinfo, f"{txt}:1", "expected 'question<TAB>answer'")
    assert imported("mme", tmp_path / "MME", tmp_path / "lenient", lenient=True)["rejected_malformed"] == 2
    pair = [r for r in rejects(tmp_path / "lenient") if r["reason"] == "malformed"]
    assert [r["question_id"] for r in pair] == ["code_reasoning/0020.png#1", "code_reasoning/0020.png#2"]


def test_mme_lmms(tmp_path):
    colors = iter([(1, 1, 1), (2, 2, 2), (3, 3, 3)])
    rows = []
    for subtask, name, q1, q2, _ in MME:
        data = image_bytes(next(colors), "PNG" if name.endswith(".png") else "JPEG")
        for question, answer in (q1, q2):
            rows.append(
                {
                    "question_id": f"{subtask}/{name}",
                    "image": cell(data, name),
                    "question": question,
                    "answer": answer,
                    "category": subtask,
                }
            )
    schema = pa.schema(
        [
            ("question_id", pa.string()),
            ("image", IMAGE),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("category", pa.string()),
        ]
    )
    src = hub(tmp_path, "MME", {"data/test-00000-of-00001.parquet": pa.Table.from_pylist(rows, schema=schema)})
    out = tmp_path / "out"
    assert imported("mme", src, out) == {"imported": 6, "images": 3, "rejected_missing_image": 0}
    check_mme(out)

    path = src / "snapshots" / SNAPSHOT / "data" / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:3], schema=schema), path)  # OCR's pair is cut in half
    with pytest.raises(DataError) as excinfo:
        imported("mme", src, tmp_path / "bad")
    one_line_error(excinfo, f"{path}: row 2", "has 1 question(s), not MME's pair of two")
    assert imported("mme", src, tmp_path / "lenient", lenient=True) == {
        "imported": 2,
        "images": 1,
        "rejected_missing_image": 0,
        "rejected_malformed": 1,
    }
    assert rejects(tmp_path / "lenient")[0]["question_id"] == "OCR/0001.jpg#1"
