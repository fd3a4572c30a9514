"""VQAv2 from the official VQA v2 JSON files and COCO's images, or from lmms-lab's Parquet.

Imported: ``question_id`` VQA's question id (as a string), ``text`` the question + "\\nAnswer the
question using a single word or phrase." (LLaVA-1.5's prompt: its ``llava_vqav2_mscoco_test-dev2015.jsonl``
lines read ``{"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg", "text": "Is the ball
flying towards the batter?\\nAnswer the question using a single word or phrase.", "category":
"default"}``), ``category`` the answer type ("yes/no", "number", "other"), ``answer`` the list of the
ten human answers (the scorer's soft accuracy, ``min(1, matches / 3)`` over leave-one-out subsets),
``extra`` ``question_type`` (the first words, e.g. "what color is") and ``multiple_choice_answer`` (the
most frequent answer); the image ``COCO_{split}_{image_id:012d}.jpg``. LLaVA itself evaluates test-dev
on EvalAI (no answers offline); this imports the splits with answers.

llava source (``--src`` a folder with VQA's files; ``val2014`` the default, ``train2014`` to train on):

- ``v2_OpenEnded_mscoco_{split}_questions.json``: ``{"info", "task_type", "data_type", "data_subtype",
  "license", "questions": [{"image_id": int, "question": str, "question_id": int}]}``; all three kept.
- ``v2_mscoco_{split}_annotations.json``: ``{"info", "license", "data_type", "data_subtype",
  "annotations": [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
  "answers": [10 x {"answer", "answer_confidence" (yes/maybe/no, not kept), "answer_id" (1..10, not
  kept)}]}]}``, linked to its question by ``question_id`` (a question without one, or with another
  ``image_id``, is malformed).
- images: COCO's ``{split}/`` folder (``src/{split}``, ``src/images/{split}``, or ``--images``).

lmms source (``lmms-lab/VQAv2``, config ``default``, ``data/{split}-*.parquet``): columns
``question_type``, ``multiple_choice_answer``, ``answers`` (the same list of ``{answer,
answer_confidence, answer_id}``), ``image_id``, ``answer_type``, ``question_id``, ``question``, ``image``
(``{bytes, path}``), mapped as above. Only ``validation`` (val2014, 214,354 questions) has answers;
``testdev`` and ``test`` have none and cannot be scored, so they are not offered.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tprl_ray.data.importers.common import (
    Bad,
    ImageRef,
    Item,
    find_dir,
    find_file,
    missing_fields,
    parquet_files,
    parquet_image,
    parquet_rows,
    read_json,
)
from tprl_ray.data.layout import DataError

SPLITS = {"llava": ("val2014", "train2014"), "lmms": ("validation",)}
SUFFIX = "\nAnswer the question using a single word or phrase."
LMMS_COCO = {"validation": "val2014"}  # the COCO split of each lmms-lab split (for the image names)


def records(src: Path, source: str, split: str, images: Path | None) -> Iterator[Item | Bad]:
    if source == "lmms":
        yield from _lmms(src, split)
    else:
        yield from _llava(src, split, images)


def _answers(annotation: dict, where: str, qid: str) -> tuple[list[str], str, dict] | Bad:
    """(the human answers, the answer type, extra) of one annotation, or why it is malformed."""
    if problem := missing_fields(annotation, ("answers", "answer_type")):
        return Bad(where, problem, qid)
    answers = annotation["answers"]
    if not isinstance(answers, list) or not answers:
        return Bad(where, "answers must be a non-empty list", qid)
    if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        return Bad(where, "every answer must be an object with a string 'answer'", qid)
    if not isinstance(annotation["answer_type"], str):
        return Bad(where, "answer_type must be a string", qid)
    extra = {
        "question_type": annotation.get("question_type"),
        "multiple_choice_answer": annotation.get("multiple_choice_answer"),
    }
    return [a["answer"] for a in answers], annotation["answer_type"], extra


def _listed(path: Path, key: str) -> list:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected an object with a {key!r} list")
    return data[key]


def _llava(src: Path, split: str, images: Path | None) -> Iterator[Item | Bad]:
    qpath = find_file(src, f"v2_OpenEnded_mscoco_{split}_questions.json", "VQA v2 question file")
    apath = find_file(src, f"v2_mscoco_{split}_annotations.json", "VQA v2 annotation file")
    image_dir = images or find_dir(src, (split, f"images/{split}", f"coco/{split}"), f"COCO's {split} images")
    questions = _listed(qpath, "questions")
    annotations = {
        str(a["question_id"]): a for a in _listed(apath, "annotations") if isinstance(a, dict) and "question_id" in a
    }
    for i, question in enumerate(questions):
        where = f"{qpath}: question {i}"
        if not isinstance(question, dict):
            yield Bad(where, f"expected an object, got {type(question).__name__}")
            continue
        if problem := missing_fields(question, ("question_id", "image_id", "question")):
            yield Bad(where, problem, str(question.get("question_id", "")))
            continue
        qid, image_id = str(question["question_id"]), question["image_id"]
        if not isinstance(image_id, int) or not isinstance(question["question"], str):
            yield Bad(where, "image_id must be an integer and question a string", qid)
            continue
        annotation = annotations.get(qid)
        if annotation is None:
            yield Bad(where, f"question {qid} has no annotation in {apath}", qid)
            continue
        if annotation.get("image_id") != image_id:
            yield Bad(where, f"image_id {image_id} but {apath.name} says {annotation.get('image_id')}", qid)
            continue
        answers = _answers(annotation, f"{where} ({apath.name}: question {qid})", qid)
        if isinstance(answers, Bad):
            yield answers
            continue
        name = f"COCO_{split}_{image_id:012d}.jpg"
        image = ImageRef(name=name, path=image_dir / name)
        yield Item(qid, question["question"] + SUFFIX, answers[1], answers[0], image, where, answers[2])


def _lmms(src: Path, split: str) -> Iterator[Item | Bad]:
    columns = ["question_id", "image_id", "question", "answers", "answer_type", "question_type"]
    columns += ["multiple_choice_answer", "image"]
    for where, row in parquet_rows(parquet_files(src, split), columns):
        qid = str(row["question_id"] if row["question_id"] is not None else "")
        if problem := missing_fields(row, ("question_id", "image_id", "question", "image")):
            yield Bad(where, problem, qid)
            continue
        if not isinstance(row["image_id"], int) or not isinstance(row["question"], str):
            yield Bad(where, "image_id must be an integer and question a string", qid)
            continue
        answers = _answers(row, where, qid)
        if isinstance(answers, Bad):
            yield answers
            continue
        image = parquet_image(row["image"], where, qid)
        if isinstance(image, Bad):
            yield image
            continue
        name = f"COCO_{LMMS_COCO[split]}_{row['image_id']:012d}.jpg"
        image = ImageRef(name=name, data=image.data)
        yield Item(qid, row["question"] + SUFFIX, answers[1], answers[0], image, where, answers[2])
