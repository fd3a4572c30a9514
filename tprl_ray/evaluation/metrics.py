"""Scorers of the eight benchmarks, each following the official scorer as LLaVA-1.5's evaluation runs it.

- digits: this project's synthetic set; exact match after lowercase / strip / whitespace collapse.
- vqav2: VQA soft accuracy of GT-Vision-Lab ``vqaEval.py`` (mean over the 10 leave-one-out subsets of
  ``min(1, matches / 3)``), answers normalised like the ``EvalAIAnswerProcessor`` that LLaVA's
  ``scripts/convert_vqav2_for_submission.py`` applies.
- gqa: LLaVA ``scripts/convert_gqa_for_eval.py`` (``rstrip('.').lower()``), then GQA ``eval.py`` exact match.
- pope: LLaVA ``llava/eval/eval_pope.py`` (first-sentence yes/no parsing; accuracy, precision, recall, F1,
  yes ratio per split).
- mme: MME ``eval_tool/calculation.py`` (acc + acc+ per subtask, perception and cognition totals).
- mmbench: MMBench CircularEval: a question counts only if all its rotations are right; rule-based
  answer extraction (no ChatGPT fallback).
- seed: LLaVA ``scripts/convert_seed_for_submission.py`` (accuracy per question type).
- scienceqa: LLaVA ``llava/eval/eval_science_qa.py`` (option letter, "X. ...", or "The answer is X.").
"""

from __future__ import annotations

import re
from collections import defaultdict

from tprl_ray.config import known_name
from tprl_ray.data.config import CATEGORIES as DIGITS_CATEGORIES
from tprl_ray.data.config import MME_SUBTASKS

BENCHMARKS = ("digits", "vqav2", "gqa", "pope", "mme", "mmbench", "seed", "scienceqa")

_REQUIRED = ("question_id", "category", "prediction", "answer")
_EXTRA_REQUIRED = {"mme": ("image",), "mmbench": ("index", "options")}


# The question categories a benchmark's scorer knows (the others take any category).
BENCHMARK_CATEGORIES = {
    "digits": DIGITS_CATEGORIES,
    "mme": tuple(subtask for subtasks in MME_SUBTASKS.values() for subtask in subtasks),
}


def score_benchmark(benchmark: str, records: list[dict]) -> dict:
    """Score one benchmark's prediction records.

    records: one dict per question: ``{"question_id": str, "category": str, "prediction": str,
    "answer": str | list[str], **extra}``. Returns ``{"score": float, "per_category": {cat: float},
    "n": int, **details}``; scores are on a 0..1 scale except MME (its own 0..2000 / 0..800 scale).
    """
    known_name("benchmark", benchmark, _SCORERS)
    for i, record in enumerate(records):
        for field in _REQUIRED + _EXTRA_REQUIRED.get(benchmark, ()):
            if field not in record:
                qid = record.get("question_id", f"#{i} (no question_id)")
                raise ValueError(f"{benchmark} record {qid!r} is missing required field {field!r}")
    return _SCORERS[benchmark](records)


# ----------------------------------------------------------------------------- shared helpers


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _summary(categories: list[str], values: list[float]) -> dict:
    """Overall mean of ``values`` and mean per category."""
    groups: dict[str, list[float]] = defaultdict(list)
    for category, value in zip(categories, values):
        groups[category].append(value)
    return {"score": _mean(values), "per_category": {c: _mean(v) for c, v in sorted(groups.items())}, "n": len(values)}


# A letter standing alone at the start: "B", "B.", "B) text", "(B)", "B: text"; not "A cat".
_LEADING_LETTER = re.compile(r"\s*\(?([A-E])(?:$|[.):,])")
_ANSWER_IS = re.compile(r"The answer is ([A-E])\b")


def parse_choice(prediction: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter a multiple-choice prediction picks, or None.

    In order: a letter standing alone at the start; a single "The answer is X" (ScienceQA's CoT form);
    the prediction equal to one option's text (case-insensitive).
    """
    if match := _LEADING_LETTER.match(prediction):
        return match.group(1)
    if len(found := _ANSWER_IS.findall(prediction)) == 1:
        return found[0]
    text = prediction.strip().lower()
    return next((letter for letter, option in (options or {}).items() if option.strip().lower() == text), None)


def _choice_hits(records: list[dict]) -> list[bool]:
    return [parse_choice(r["prediction"], r.get("options")) == r["answer"].strip().upper() for r in records]


# ----------------------------------------------------------------------------- digits, gqa, seed, scienceqa


def _score_digits(records: list[dict]) -> dict:
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    return _summary([r["category"] for r in records], [norm(r["prediction"]) == norm(r["answer"]) for r in records])


def _score_gqa(records: list[dict]) -> dict:
    def norm(text: str) -> str:
        return text.strip().rstrip(".").lower()

    return _summary([r["category"] for r in records], [norm(r["prediction"]) == norm(r["answer"]) for r in records])


def _score_multiple_choice(records: list[dict]) -> dict:
    return _summary([r["category"] for r in records], _choice_hits(records))


# ----------------------------------------------------------------------------- vqav2

# The official contraction table: every key is its contracted form with one apostrophe left out
# ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've").
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've""".split()
_CONTRACTIONS = {word[:i] + word[i + 1 :]: word for word in _CONTRACTED for i, ch in enumerate(word) if ch == "'"}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("1.5" keeps its point)


def normalize_vqa_answer(text: str) -> str:
    """VQA answer normalisation (EvalAI): lowercase, punctuation, number words, articles, contractions."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark touching a space is deleted, otherwise it becomes a space ("black-white" ->
    # "black white"). (The official digit-comma rule never fires: commas are already gone.)
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if mark + " " in text or " " + mark in text else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of ``min(1, matches / 3)``."""
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(a) == pred for a in answers]
    return _mean(min(1.0, (sum(hits) - hit) / 3) for hit in hits)


def _score_vqav2(records: list[dict]) -> dict:
    for r in records:
        if not isinstance(r["answer"], list):
            raise ValueError(f"vqav2 record {r['question_id']!r}: 'answer' must be the list of human answers")
    return _summary(
        [r["category"] for r in records], [vqa_soft_accuracy(r["prediction"], r["answer"]) for r in records]
    )


# ----------------------------------------------------------------------------- pope


def pope_says_yes(prediction: str) -> bool:
    """LLaVA's eval_pope: first sentence, commas dropped; "No", "no" or "not" as a word means no."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return not {"No", "no", "not"} & set(words)


def _binary_metrics(preds: list[bool], labels: list[bool]) -> dict:
    """Accuracy, precision, recall, F1 and yes ratio, "yes" being the positive class (0 where undefined)."""
    tp = sum(p and y for p, y in zip(preds, labels))
    fp = sum(p and not y for p, y in zip(preds, labels))
    fn = sum(y and not p for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": _mean(p == y for p, y in zip(preds, labels)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": _mean(preds),
    }


def _score_pope(records: list[dict]) -> dict:
    """per_category is the F1 of each split; score is the mean F1 over splits."""
    by_split: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_split[r["category"]].append(r)
    splits = {
        split: _binary_metrics(
            [pope_says_yes(r["prediction"]) for r in rs], [r["answer"].strip().lower() != "no" for r in rs]
        )
        for split, rs in sorted(by_split.items())
    }
    f1 = {split: m["f1"] for split, m in splits.items()}
    return {"score": _mean(f1.values()), "per_category": f1, "n": len(records), "splits": splits}


# ----------------------------------------------------------------------------- mme


def mme_label(prediction: str) -> str:
    """MME calculation.py: "yes"/"no" if the answer is, or its first 4 characters contain, it; else "other"."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _score_mme(records: list[dict]) -> dict:
    """Per subtask: acc (% questions right) + acc+ (% images with all, i.e. both, questions right)."""
    known = {name for names in MME_SUBTASKS.values() for name in names}
    by_subtask: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["category"] not in known:
            raise ValueError(f"mme record {r['question_id']!r}: unknown MME subtask {r['category']!r}")
        right = mme_label(r["prediction"]) == r["answer"].strip().lower()
        by_subtask[r["category"]][r["image"]].append(right)
    subtasks = {}
    for name, images in sorted(by_subtask.items()):
        acc = 100 * _mean(hit for hits in images.values() for hit in hits)
        acc_plus = 100 * _mean(all(hits) for hits in images.values())
        subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    totals = {group: sum(subtasks[n]["score"] for n in names if n in subtasks) for group, names in MME_SUBTASKS.items()}
    return {
        "score": totals["perception"],
        "per_category": {n: s["score"] for n, s in subtasks.items()},
        "n": len(records),
        **totals,
        "subtasks": subtasks,
    }


# ----------------------------------------------------------------------------- mmbench


def _score_mmbench(records: list[dict]) -> dict:
    """Circular accuracy: a question (``index``) is right only if every one of its rotations is."""
    rotations: dict[object, list[bool]] = defaultdict(list)
    category = {}
    for r, hit in zip(records, _choice_hits(records)):
        rotations[r["index"]].append(hit)
        category[r["index"]] = r["category"]
    indices = list(rotations)
    result = _summary([category[i] for i in indices], [all(rotations[i]) for i in indices])
    return {**result, "n": len(records), "n_questions": len(indices)}


_SCORERS = {
    "digits": _score_digits,
    "vqav2": _score_vqav2,
    "gqa": _score_gqa,
    "pope": _score_pope,
    "mme": _score_mme,
    "mmbench": _score_mmbench,
    "seed": _score_multiple_choice,
    "scienceqa": _score_multiple_choice,
}
