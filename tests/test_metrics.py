"""Benchmark scorers on hand-made records; every expected number is worked out by hand in a comment."""

import pytest

from tprl_ray.evaluation.metrics import (
    BENCHMARKS,
    mme_label,
    normalize_vqa_answer,
    parse_choice,
    pope_says_yes,
    score_benchmark,
    vqa_soft_accuracy,
)


def rec(qid, category, prediction, answer, **extra):
    return {"question_id": qid, "category": category, "prediction": prediction, "answer": answer, **extra}


def test_digits_exact_match_after_case_and_whitespace():
    records = [
        rec("1", "count", " Three  Cats ", "three cats"),  # same after lower/strip/collapse: hit
        rec("2", "count", "4", "5"),  # miss
        rec("3", "color", "RED", "red"),  # hit
        rec("4", "color", "red.", "red"),  # punctuation is kept: miss
        rec("5", "color", "blue", "blue"),
    ]  # hit
    result = score_benchmark("digits", records)
    # count 1/2, color 2/3, overall 3/5
    assert result["score"] == pytest.approx(0.6)
    assert result["per_category"] == pytest.approx({"count": 0.5, "color": 2 / 3})
    assert result["n"] == 5


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # trailing period stripped, number word -> digit
        ("None", "0"),  # "none" is a number word too
        ("The dog", "dog"),  # articles dropped
        ("An apple, maybe?", "apple maybe"),  # "," and "?" removed outright
        ("dont", "don't"),  # contraction restored
        ("couldnt've", "couldn't've"),
        ("it's", "it 's"),  # "'s" split off like the EvalAI tokenizer does
        ("black-white", "black white"),  # mark not touching a space -> space
        ("black - white", "black white"),  # mark touching a space -> deleted
        ("1.5", "1.5"),  # decimal point kept
        ("3.", "3"),
        ("yes\n", "yes"),
    ],
)
def test_vqa_answer_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_soft_accuracy_is_leave_one_out():
    # 3 of 10 humans match. Leaving out a matching one: 2 left -> 2/3 (3 subsets); leaving out another:
    # 3 left -> 1 (7 subsets). (3 * 2/3 + 7) / 10 = 0.9, not the naive min(1, 3/3) = 1.
    assert vqa_soft_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vqav2_score_per_answer_type():
    records = [
        # "Two." -> "2"; M=3 matches: (3*2/3 + 7*1)/10 = 0.9
        rec("q1", "number", "Two.", ["2"] * 3 + ["3"] * 7),
        # M=10: every subset has 9 matches -> 1.0
        rec("q2", "yes/no", "yes", ["yes"] * 10),
        # "the black-white cat" -> "black white cat"; M=1: (1*0 + 9*1/3)/10 = 0.3
        rec("q3", "other", "the black-white cat", ["black white cat"] + ["black and white"] * 9),
        # "dont" -> "don't"; M=2: (2*1/3 + 8*2/3)/10 = 0.6
        rec("q4", "other", "dont", ["don't"] * 2 + ["no"] * 8),
        # "three" -> "3", no match -> 0
        rec("q5", "number", "three", ["2"] * 10),
    ]
    result = score_benchmark("vqav2", records)
    # overall (0.9 + 1 + 0.3 + 0.6 + 0) / 5 = 0.56; number (0.9+0)/2, other (0.3+0.6)/2
    assert result["score"] == pytest.approx(0.56)
    assert result["per_category"] == pytest.approx({"number": 0.45, "yes/no": 1.0, "other": 0.45})
    assert result["n"] == 5


def test_vqav2_needs_the_list_of_answers():
    with pytest.raises(ValueError, match="q1.*list of human answers"):
        score_benchmark("vqav2", [rec("q1", "other", "red", "red")])


def test_gqa_lowercases_and_strips_trailing_periods_only():
    records = [
        rec("1", "verify", "Yes.", "yes"),  # hit
        rec("2", "relate", "left", "right"),  # miss
        rec("3", "relate", "The table", "table"),  # no article removal in GQA: miss
        rec("4", "attr", "Wooden...", "wooden"),
    ]  # every trailing period goes: hit
    result = score_benchmark("gqa", records)
    # verify 1/1, relate 0/2, attr 1/1; overall 2/4
    assert result["score"] == pytest.approx(0.5)
    assert result["per_category"] == pytest.approx({"verify": 1.0, "relate": 0.0, "attr": 1.0})


@pytest.mark.parametrize(
    "prediction, says_yes",
    [
        ("Yes, there is a dog.", True),
        ("No, there is no dog.", False),
        ("There is not a dog in the image.", False),
        ("No.", False),
        ("Yes. No cats, though.", True),  # only the first sentence counts
        ("Nothing", True),  # "no" must be a whole word
        ("NO", True),  # LLaVA's rule only knows "No", "no", "not"
    ],
)
def test_pope_parsing(prediction, says_yes):
    assert pope_says_yes(prediction) is says_yes


def test_pope_metrics_per_split():
    records = [
        rec("a1", "adversarial", "Yes", "yes"),  # TP
        rec("a2", "adversarial", "No", "yes"),  # FN
        rec("a3", "adversarial", "Yes, there is.", "no"),  # FP
        rec("a4", "adversarial", "There is no cat.", "no"),  # TN
        rec("r1", "random", "Yes", "yes"),  # TP
        rec("r2", "random", "Yes.", "yes"),  # TP
        rec("r3", "random", "Yes, there is a cat. No doubt.", "no"),  # first sentence says yes: FP
        rec("r4", "random", "No", "no"),  # TN
    ]
    result = score_benchmark("pope", records)
    # adversarial: TP=FP=FN=TN=1 -> acc 2/4, precision 1/2, recall 1/2, F1 1/2, yes ratio 2/4
    assert result["splits"]["adversarial"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    )
    # random: TP=2, FP=1, TN=1, FN=0 -> acc 3/4, precision 2/3, recall 1, F1 2*(2/3)/(5/3) = 0.8, yes 3/4
    assert result["splits"]["random"] == pytest.approx(
        {"accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "yes_ratio": 0.75}
    )
    # per_category is F1 per split; score is their mean (0.5 + 0.8) / 2
    assert result["per_category"] == pytest.approx({"adversarial": 0.5, "random": 0.8})
    assert result["score"] == pytest.approx(0.65)
    assert result["n"] == 8


@pytest.mark.parametrize(
    "prediction, label",
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("Yes, it is", "yes"),
        ("nope", "no"),
        ("not sure", "no"),  # "no" within the first 4 characters
        ("It is yes", "other"),  # neither in the first 4 characters
        ("maybe", "other"),
    ],
)
def test_mme_parsing(prediction, label):
    assert mme_label(prediction) == label


def test_mme_acc_plus_needs_both_questions_of_an_image():
    records = [
        # existence: img1 both right, img2 one right -> acc 3/4 = 75, acc+ 1/2 = 50, score 125
        rec("e1", "existence", "Yes", "Yes", image="img1.jpg"),
        rec("e2", "existence", "No", "No", image="img1.jpg"),
        rec("e3", "existence", "Yes", "Yes", image="img2.jpg"),
        rec("e4", "existence", "Yes", "No", image="img2.jpg"),
        # OCR, same image name but another subtask: "maybe" is "other" (wrong) -> acc 50, acc+ 0, score 50
        rec("o1", "OCR", "maybe", "Yes", image="img1.jpg"),
        rec("o2", "OCR", "no", "No", image="img1.jpg"),
        # code_reasoning (cognition): both right -> 100 + 100 = 200
        rec("c1", "code_reasoning", "yes", "Yes", image="code.png"),
        rec("c2", "code_reasoning", "No, it is not.", "No", image="code.png"),
    ]
    result = score_benchmark("mme", records)
    assert result["subtasks"]["existence"] == pytest.approx({"acc": 75.0, "acc_plus": 50.0, "score": 125.0})
    assert result["subtasks"]["OCR"] == pytest.approx({"acc": 50.0, "acc_plus": 0.0, "score": 50.0})
    assert result["per_category"] == pytest.approx({"existence": 125.0, "OCR": 50.0, "code_reasoning": 200.0})
    # perception = 125 + 50; cognition = 200; headline = perception
    assert result["perception"] == pytest.approx(175.0)
    assert result["cognition"] == pytest.approx(200.0)
    assert result["score"] == pytest.approx(175.0)


def test_mme_rejects_unknown_subtask():
    with pytest.raises(ValueError, match="m1.*unknown MME subtask 'colour'"):
        score_benchmark("mme", [rec("m1", "colour", "yes", "Yes", image="x.jpg")])


@pytest.mark.parametrize(
    "prediction, options, letter",
    [
        ("B", None, "B"),
        ("B.", None, "B"),
        ("(C)", None, "C"),
        ("D) a dog", None, "D"),
        ("A cat", {"A": "dog", "B": "A cat"}, "B"),  # "A" followed by a word is an article, then text match
        ("paris", {"A": "London", "B": "Paris"}, "B"),
        ("The answer is C.", None, "C"),
        ("The answer is A. The answer is B.", None, None),  # ambiguous
        ("Nothing", {"A": "something"}, None),
    ],
)
def test_parse_choice(prediction, options, letter):
    assert parse_choice(prediction, options) == letter


def test_mmbench_question_counts_only_if_every_rotation_is_right():
    records = [
        # index 1: three rotations, all right (letter, option text, parenthesised letter) -> right
        rec("1-0", "attribute", "B", "B", index=1, options={"A": "cat", "B": "dog", "C": "bird"}),
        rec("1-1", "attribute", "dog", "A", index=1, options={"A": "dog", "B": "bird", "C": "cat"}),
        rec("1-2", "attribute", "(C)", "C", index=1, options={"A": "bird", "B": "cat", "C": "dog"}),
        # index 2: second rotation wrong -> wrong
        rec("2-0", "attribute", "A.", "A", index=2, options={"A": "red", "B": "blue"}),
        rec("2-1", "attribute", "A", "B", index=2, options={"A": "blue", "B": "red"}),
        # index 3: both right -> right
        rec("3-0", "logic", "D) red", "D", index=3, options={"A": "a", "B": "b", "C": "c", "D": "red"}),
        rec("3-1", "logic", "C", "C", index=3, options={"A": "b", "B": "a", "C": "red", "D": "c"}),
    ]
    result = score_benchmark("mmbench", records)
    # 6/7 rotations right, but circular: questions 1 and 3 right of 3; attribute 1/2, logic 1/1
    assert result["score"] == pytest.approx(2 / 3)
    assert result["per_category"] == pytest.approx({"attribute": 0.5, "logic": 1.0})
    assert result["n"] == 7 and result["n_questions"] == 3


def test_seed_accuracy_per_question_type():
    records = [
        rec("1", "Scene Understanding", "A", "A"),  # hit
        rec("2", "Scene Understanding", "B.", "C"),  # miss
        rec("3", "Instance Counting", "(D)", "D"),  # hit
        rec("4", "Instance Counting", "The answer is B.", "B"),
    ]  # hit
    result = score_benchmark("seed", records)
    # scene 1/2, counting 2/2, overall 3/4
    assert result["score"] == pytest.approx(0.75)
    assert result["per_category"] == pytest.approx({"Scene Understanding": 0.5, "Instance Counting": 1.0})


def test_scienceqa_accepts_the_answer_is_pattern():
    records = [
        rec("1", "NAT", "A", "A"),  # hit
        rec("2", "NAT", "Because of gravity. The answer is B.", "B"),  # hit via "The answer is B."
        rec("3", "NAT", "B. It floats", "B"),  # hit via "B. " prefix
        rec("4", "SOC", "E", "C"),  # miss
        rec("5", "SOC", "FAILED", "A"),  # unparsable: miss
        rec("6", "SOC", "C", "C"),
    ]  # hit
    result = score_benchmark("scienceqa", records)
    # NAT 3/3, SOC 1/3, overall 4/6
    assert result["score"] == pytest.approx(4 / 6)
    assert result["per_category"] == pytest.approx({"NAT": 1.0, "SOC": 1 / 3})


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark 'vqa'"):
        score_benchmark("vqa", [])


@pytest.mark.parametrize(
    "benchmark, record, field",
    [
        ("digits", {"question_id": "q7", "category": "c", "answer": "1"}, "prediction"),
        ("gqa", {"question_id": "q8", "category": "c", "prediction": "1"}, "answer"),
        ("mme", rec("q9", "count", "yes", "Yes"), "image"),
        ("mmbench", rec("q10", "logic", "A", "A", index=1), "options"),
        ("mmbench", rec("q11", "logic", "A", "A", options={"A": "x"}), "index"),
    ],
)
def test_missing_field_names_question_and_field(benchmark, record, field):
    with pytest.raises(ValueError, match=f"{record['question_id']}.*'{field}'"):
        score_benchmark(benchmark, [record])


def test_missing_question_id_names_the_record_position():
    with pytest.raises(ValueError, match="#1.*'question_id'"):
        score_benchmark("seed", [rec("1", "c", "A", "A"), {"category": "c", "prediction": "A", "answer": "A"}])


def test_every_benchmark_has_a_scorer():
    for benchmark in BENCHMARKS:
        assert score_benchmark(benchmark, [])["n"] == 0
