"""Benchmark metrics on hand-worked predictions: each expected number is worked out in the comment beside it."""

from __future__ import annotations

import pytest

from sail_jax.evaluation.datasets import METRICS, compute, infer_kind
from sail_jax.evaluation.extraction import (
    mathvista,
    mathvista_extract,
    mmmu,
    mmmu_hit,
    mmmu_parse_choice,
    mmmu_parse_open,
)
from sail_jax.evaluation.metrics import (
    anls,
    anls_score,
    answers_of,
    hallusionbench,
    levenshtein,
    mcq_accuracy,
    mmbench_circular,
    mme,
    ocrbench,
    relaxed_accuracy,
    relaxed_match,
    vqa_normalize,
    vqa_soft_accuracy,
    vqa_soft_score,
)
from sail_jax.evaluation.scoring import HME_CATEGORY, KINDS

# ---------------------------------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("prediction, answers, expected", [
    ("hello", ["Hello"], 1.0),  # case ignored
    ("  New   York ", ["new york"], 1.0),  # whitespace runs collapsed
    ("helo", ["hello"], 0.8),  # distance 1 / max(5, 4) = 0.2 -> 0.8
    ("2020", ["1999", "2021"], 0.75),  # best ground truth: "2021", distance 1 / 4 -> 0.75 ("1999": 4 / 4 -> 0)
    ("ab", ["abcd"], 0.5),  # distance 2 / 4 = 0.5 -> similarity 0.5 is kept (only below 0.5 is zeroed)
    ("a", ["abc"], 0.0),  # distance 2 / 3 -> similarity 1/3 < 0.5 -> 0
    ("", ["abc"], 0.0),  # empty prediction: distance 3 / 3 -> 0
])
def test_anls_score(prediction, answers, expected):
    assert anls_score(prediction, answers) == pytest.approx(expected)


def test_anls_report_per_category():
    rows = [
        {"index": 1, "prediction": "hello", "answer": "['hello', 'hi']", "category": "form"},  # 1.0
        {"index": 2, "prediction": "helo", "answer": "hello", "category": "form"},  # 0.8
        {"index": 3, "prediction": float("nan"), "answer": "table", "category": "table"},  # NaN = empty -> 0
    ]
    scores = anls(rows)
    assert scores["n"] == 3
    assert scores["overall"] == pytest.approx(60.0)  # (1.0 + 0.8 + 0) / 3
    assert scores["per_category"] == pytest.approx({"form": 90.0, "table": 0.0})


# ---------------------------------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize("prediction, answers, expected", [
    ("12.4", ["12"], True),  # |12.4 - 12| / 12 = 3.3% <= 5%
    ("12.7", ["12"], False),  # 0.7 / 12 = 5.8% > 5%
    ("7", ["Seven", "7.2"], True),  # several answers: 0.2 / 7.2 = 2.8% against the second
    ("45%", ["0.45"], True),  # a percent sign means hundredths: 0.45 == 0.45
    ("44%", ["45%"], True),  # 0.44 vs 0.45: 2.2%
    ("45", ["45%"], False),  # 45 vs 0.45 (VLMEvalKit does not drop the sign of only one side)
    ("1,000", ["1,000"], True),  # commas are not numbers: equal text
    ("1,000", ["1000"], False),  # "1,000" is text, compared as text with "1000"
    (" Yes ", ["yes"], True),  # text: stripped prediction, case-insensitive equality
    ("0.01", ["0"], False),  # a zero target needs the exact text
    ("0", ["0"], True),
    ("", ["5"], False),  # empty prediction
])
def test_relaxed_match(prediction, answers, expected):
    assert relaxed_match(prediction, answers) is expected


def test_relaxed_accuracy():
    rows = [{"prediction": p, "answer": a} for p, a in [("12.4", "12"), ("13", "12"), ("45%", "0.45"), ("Yes", "yes")]]
    assert relaxed_accuracy(rows) == {"n": 4, "overall": 75.0}  # 3 of 4


# ---------------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize("text, expected", [
    ("The dog.", "dog"),  # period dropped, lowercase, article dropped
    ("Hello, world!", "hello world"),  # "," next to a space goes; "!" at the end becomes a space
    ("1,000 people", "1000 people"),  # a thousands comma: every punctuation mark is dropped, not spaced
    ("3.5", "3.5"),  # decimal point kept
    ("two dogs", "2 dogs"),  # number words as digits
    ("Dont", "don't"),  # contraction restored
    ("couldnt've", "couldn't've"),
    ("left-hand", "left hand"),  # a hyphen between letters becomes a space
])
def test_vqa_normalize(text, expected):
    assert vqa_normalize(text) == expected


@pytest.mark.parametrize("matching, expected", [
    # m of 10 humans agree; leaving out each human: the m agreeing ones see m-1 others, the rest see m
    (0, 0.0),
    (1, 0.3),  # (1 * min(1, 0/3) + 9 * min(1, 1/3)) / 10
    (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0),  # (4 * 1 + 6 * 1) / 10
])
def test_vqa_soft_score_ten_humans(matching, expected):
    answers = ["two"] * matching + ["three"] * (10 - matching)
    assert vqa_soft_score("2", answers) == pytest.approx(expected)  # "two" normalises to "2"


def test_vqa_soft_accuracy():
    rows = [
        {"prediction": "The dog.", "answer": str(["dog"] * 3 + ["cat"] * 7)},  # 3 agree -> 0.9
        {"prediction": "Don't", "answer": str(["dont"] * 10)},  # all agree -> 1.0
        {"prediction": "", "answer": str(["dog"] * 10)},  # empty prediction -> 0
        {"prediction": "1,000", "answer": str(["1000"] + ["100"] * 9)},  # one agrees -> 0.3
    ]
    assert vqa_soft_accuracy(rows)["overall"] == pytest.approx(55.0)  # (0.9 + 1 + 0 + 0.3) / 4


# ---------------------------------------------------------------------------------------------------- multiple choice

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "white"}


def _mcq(index, answer, prediction, category="cat1", l2="L1"):
    return {"index": index, "question": "Which colour?", "answer": answer, "prediction": prediction,
            "category": category, "l2-category": l2, **OPTIONS}


def test_mcq_accuracy():
    rows = [
        _mcq(1, "B", "(B)"),  # right
        _mcq(2, "C", "The answer is C", category="cat2"),  # right
        _mcq(3, "A", "", category="cat2"),  # empty prediction: wrong
        _mcq(4, "D", "A. red", l2="L2"),  # wrong letter
    ]
    scores = mcq_accuracy(rows)
    assert scores["overall"] == 50.0  # 2 of 4
    assert scores["per_category"] == {"cat1": 50.0, "cat2": 50.0}
    assert scores["per_l2_category"] == pytest.approx({"L1": 200 / 3, "L2": 0.0})


def test_mmbench_circular():
    rows = [
        # question 1 and its three shifted copies (index + k * 1e6), all right -> counts
        _mcq(1, "A", "A"), _mcq(1000001, "B", "B."), _mcq(2000001, "C", "(C) blue"), _mcq(3000001, "D", "D"),
        # question 2: one copy wrong -> the question is wrong, though 2 of its 3 rows are right
        _mcq(2, "A", "A"), _mcq(1000002, "B", "C"), _mcq(2000002, "C", "C"),
        # question 3 without copies, right
        _mcq(3, "B", "B", category="cat2", l2="L2"),
        # a copy whose original is not in the file: dropped
        _mcq(1000009, "A", "A"),
    ]
    scores = mmbench_circular(rows)
    assert scores["n"] == 3 and scores["n_rows"] == 8
    assert scores["overall"] == pytest.approx(200 / 3)  # questions 1 and 3 of 3
    assert scores["per_category"] == {"cat1": 50.0, "cat2": 100.0}
    assert scores["per_l2_category"] == {"L1": 50.0, "L2": 100.0}
    assert mcq_accuracy(rows)["overall"] == pytest.approx(800 / 9)  # vanilla: 8 of 9 rows right


def test_mmbench_circular_rejects_text_index():
    with pytest.raises(ValueError, match=r"row 0 \(index q1\): circular evaluation needs integer indices"):
        mmbench_circular([_mcq("q1", "A", "A")])


# ---------------------------------------------------------------------------------------------------- MME


def _yn(category, image, answer, prediction, **extra):
    return {"category": category, "image_path": image, "answer": answer, "prediction": prediction, **extra}


def test_mme():
    rows = [
        _yn("existence", "e1.jpg", "Yes", "Yes"),  # right
        _yn("existence", "e1.jpg", "No", "No, there is not."),  # right -> image e1 fully right
        _yn("existence", "e2.jpg", "Yes", "yes"),  # right
        _yn("existence", "e2.jpg", "No", "Yes"),  # wrong -> image e2 has one of two right
        _yn("code_reasoning", "c1.jpg", "Yes", "Yes, it prints 3."),  # right
        _yn("code_reasoning", "c1.jpg", "No", "Maybe"),  # no yes/no word: wrong
    ]
    scores = mme(rows)
    assert scores["n"] == 6
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; code_reasoning: acc 1/2 = 50, acc+ 0/1 = 0 -> 50
    assert scores["per_subtask"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert scores["per_subtask"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert scores["perception"] == 125.0
    assert scores["cognition"] == 50.0


def test_mme_needs_image_path():
    with pytest.raises(ValueError, match=r"row 0 \(index 7\): missing key 'image_path'"):
        mme([{"index": 7, "category": "OCR", "answer": "Yes", "prediction": "Yes"}])


# ---------------------------------------------------------------------------------------------------- HallusionBench


def test_hallusionbench():
    # index fields 3, 4, 5 are the set, figure and question ids
    rows = [
        _yn("VS", "", "Yes", "Yes", index="VS_chart_x_0_0_0", **{"l2-category": "chart"}),  # set 0 figure 0 q 0: right
        _yn("VS", "", "No", "No", index="VS_chart_x_0_0_1", **{"l2-category": "chart"}),  # set 0 figure 0 q 1: right
        _yn("VS", "", "No", "Yes", index="VS_chart_x_0_1_0", **{"l2-category": "chart"}),  # set 0 figure 1 q 0: wrong
        _yn("VS", "", "Yes", "Yes", index="VS_chart_x_0_1_1", **{"l2-category": "chart"}),  # set 0 figure 1 q 1: right
        _yn("VD", "", "Yes", "Yes", index="VD_figure_x_1_0_0", **{"l2-category": "figure"}),  # set 1: right
    ]
    scores = hallusionbench(rows)
    # aAcc: 4 of 5 questions. Figures: chart/0/0 right, chart/0/1 wrong, figure/1/0 right -> 2 of 3.
    # Questions: chart/0/q0 wrong on figure 1, chart/0/q1 right on both, figure/1/q0 right -> 2 of 3.
    assert scores["aAcc"] == pytest.approx(80.0)
    assert scores["fAcc"] == pytest.approx(200 / 3)
    assert scores["qAcc"] == pytest.approx(200 / 3)
    assert scores["per_category"]["VS"] == pytest.approx({"aAcc": 75.0, "fAcc": 50.0, "qAcc": 50.0})
    assert scores["per_category"]["VD"] == pytest.approx({"aAcc": 100.0, "fAcc": 100.0, "qAcc": 100.0})
    assert scores["per_l2_category"]["chart"] == scores["per_category"]["VS"]


def test_hallusionbench_explicit_ids_and_bad_index():
    rows = [_yn("VS", "", "Yes", "Yes", set_id=0, figure_id=0, question_id=0),
            _yn("VS", "", "Yes", "No", set_id=0, figure_id=1, question_id=0)]
    scores = hallusionbench(rows)
    assert (scores["aAcc"], scores["fAcc"], scores["qAcc"]) == (50.0, 50.0, 0.0)  # one question, wrong on figure 1
    with pytest.raises(ValueError, match=r"row 0 \(index 12\): HallusionBench index needs 6"):
        hallusionbench([_yn("VS", "", "Yes", "Yes", index=12)])


# ---------------------------------------------------------------------------------------------------- OCRBench


def test_ocrbench():
    rows = [
        {"category": "Regular Text Recognition", "answer": "['hello']", "prediction": "The text is HELLO"},  # contained
        {"category": "Digit String Recognition", "answer": "['123']", "prediction": "12"},  # not contained
        {"category": "Doc-oriented VQA", "answer": "['Paris', 'paris city']", "prediction": "paris"},  # first answer
        {"category": HME_CATEGORY, "answer": "['x^2 + 1']", "prediction": "x^2+1"},  # spaces removed on both sides
    ]
    scores = ocrbench(rows)
    assert scores["final_score"] == 3 and scores["overall"] == 75.0
    assert scores["per_group"] == {"Text Recognition": 1, "Scene Text-centric VQA": 0, "Doc-oriented VQA": 1,
                                   "Key Information Extraction": 0, HME_CATEGORY: 1}


# ---------------------------------------------------------------------------------------------------- MMMU

MMMU_OPTIONS = {"A": "red", "B": "dark red", "C": "blue"}


@pytest.mark.parametrize("response, expected", [
    ("The answer is (B).", "B"),  # bracketed letter
    ("B", "B"),  # lone letter
    ("A or C? I pick C", "C"),  # two lone letters: the one written last
    ("I am fairly sure the colour is blue", "C"),  # over five words, no letter: option text
    ("The colour of the car is dark red", "A"),  # "red" and "dark red" both occur; "red" ends last (MMMU's rule)
    ("blue", None),  # one word and no letter: nothing (MMMU would guess at random)
    ("", None),  # empty prediction
])
def test_mmmu_parse_choice(response, expected):
    assert mmmu_parse_choice(response, MMMU_OPTIONS) == expected


def test_mmmu_parse_open():
    # tails after "so ", "is ", "result ": the shortest is "3.50 dollars"; its number 3.50 -> 3.5
    assert set(mmmu_parse_open("So the result is 3.50 dollars.")) == {"3.50 dollars", 3.5}
    # "1,000" is one number (commas dropped); MMMU's plain-number pattern also reads its last group "000" as 0
    assert set(mmmu_parse_open("It is 1,000")) == {1000.0, 0.0}
    assert mmmu_parse_open("x") == [" x", "x "]  # one letter padded so it does not match inside words


@pytest.mark.parametrize("prediction, answer, expected", [
    ("So the result is 3.50 dollars.", "3.5", True),  # numbers compared after rounding to 2 decimals
    ("The capital is Paris", "paris", True),  # text answer contained in the parsed tail
    ("It is 1,000", "1000", True),
    ("The answer is 5", "4", False),
    ("", "4", False),  # empty prediction
])
def test_mmmu_open_rows(prediction, answer, expected):
    assert mmmu_hit({"prediction": prediction, "answer": answer})[0] is expected


def test_mmmu_report():
    rows = [
        {"prediction": "(B)", "answer": "B", "category": "Art", **MMMU_OPTIONS},  # multiple choice, right
        {"prediction": "blue", "answer": "C", "category": "Art", **MMMU_OPTIONS},  # no letter found: wrong
        {"prediction": "x = 12", "answer": "['12', '12.0']", "category": "Math", "A": float("nan")},  # open, right
    ]
    scores = mmmu(rows)
    assert scores["overall"] == pytest.approx(200 / 3)
    assert scores["per_category"] == {"Art": 50.0, "Math": 100.0}


# ---------------------------------------------------------------------------------------------------- MathVista

CHOICES = "['3/11', '8/11', '6/11', '3/5']"


@pytest.mark.parametrize("row, expected", [
    ({"question_type": "multi_choice", "choices": CHOICES, "prediction": "8/11"}, "8/11"),  # a choice's text
    ({"question_type": "multi_choice", "choices": CHOICES, "prediction": "The correct answer is (B) 8/11."}, "8/11"),
    ({"question_type": "multi_choice", "choices": CHOICES, "prediction": "I cannot tell"}, None),
    ({"answer_type": "integer", "answer": "14", "prediction": "The missing number is 14."}, "14"),  # last number
    ({"answer_type": "integer", "answer": "1000", "prediction": "About 1,000 people."}, "1000"),  # commas dropped
    ({"answer_type": "integer", "answer": "3", "prediction": "3.7"}, "3"),  # int(float(x)) truncates
    ({"answer_type": "float", "precision": 2, "answer": "1.45", "prediction": "1.449"}, "1.45"),  # rounded to 2
    ({"answer_type": "float", "answer": "0.6", "prediction": "It is 0.61"}, "0.6"),  # precision from the answer
    ({"answer_type": "list", "answer": "[2007, 2008]", "prediction": 'The answer is "[2007, 2008]".'},
     "[2007, 2008]"),  # MathVista's quick rule
    ({"answer_type": "integer", "answer": "5", "prediction": ""}, None),  # empty prediction
    ({"answer_type": "integer", "answer": "5", "prediction": "no idea"}, None),
])
def test_mathvista_extract(row, expected):
    assert mathvista_extract(row) == expected


def test_mathvista_report():
    rows = [
        {"question_type": "multi_choice", "choices": CHOICES, "answer": "8/11", "prediction": "B",
         "task": "geometry problem solving", "skills": "['geometry reasoning', 'arithmetic reasoning']"},  # right
        {"question_type": "free_form", "answer_type": "integer", "answer": "14", "prediction": "15",
         "task": "math word problem", "skills": "['arithmetic reasoning']"},  # wrong
    ]
    scores = mathvista(rows)
    assert scores["overall"] == 50.0
    assert scores["per_task"] == {"geometry problem solving": 100.0, "math word problem": 0.0}
    assert scores["per_skill"] == {"arithmetic reasoning": 50.0, "geometry reasoning": 100.0}


# ---------------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name, expected", [
    ("MMBench_DEV_EN", ("mcq", "mmbench_circular")),
    ("mmbench_test_cn_v11", ("mcq", "mmbench_circular")),
    ("MMStar", ("mcq", "mcq_accuracy")),
    ("AI2D_TEST_NO_MASK", ("mcq", "mcq_accuracy")),
    ("MMMU_DEV_VAL", ("mcq", "mmmu")),
    ("MME", ("yn", "mme")),
    ("HallusionBench", ("yn", "hallusionbench")),
    ("OCRBench", ("ocr", "ocrbench")),
    ("DocVQA_VAL", ("vqa", "anls")),
    ("InfoVQA_TEST", ("vqa", "anls")),
    ("ChartQA_TEST", ("vqa", "relaxed_accuracy")),
    ("TextVQA_VAL", ("vqa", "vqa_soft")),
    ("MathVista_MINI", ("vqa", "mathvista")),
    ("/data/LMUData/MMBench_DEV_EN_V11.tsv", ("mcq", "mmbench_circular")),  # directory and extension ignored
    ("MME-RealWorld", None),  # another benchmark sharing a first word
    ("OCRBench_v2", None),
    ("MMMU_Pro", None),
    ("my_dataset", None),
    ("", None),
])
def test_infer_kind(name, expected):
    assert infer_kind(name) == expected


def test_every_inferred_kind_and_metric_exists():
    names = ["MMBench", "MMStar", "AI2D", "MMMU", "MME", "HallusionBench", "OCRBench", "DocVQA", "InfoVQA", "ChartQA",
             "TextVQA", "MathVista"]
    for kind, metric in map(infer_kind, names):
        assert kind in KINDS and metric in METRICS


def test_compute_dispatches_and_rejects_unknown():
    rows = [{"prediction": "helo", "answer": "hello"}]
    assert compute("anls", rows) == anls(rows) == {"n": 1, "overall": pytest.approx(80.0)}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        compute("bleu", rows)


def test_missing_answer_names_the_row():
    assert answers_of({"answer": "['a', 'b']"}) == ["a", "b"]
    with pytest.raises(ValueError, match=r"row 2 \(index 9\): missing key 'answer'"):
        answers_of({"index": 9, "prediction": "x"}, 2)
