"""Verifiable rewards on tricky responses: boxes, math equivalence, option letters, counts, format, mixed weights."""

from __future__ import annotations

import threading

import pytest

from sail_jax.rl import (
    RewardWeights,
    answer_reward,
    extract_boxed,
    final_answer,
    format_reward,
    math_equal,
    mixed_reward,
    option_letter,
)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}} here", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
    (r"first \boxed{2}, corrected: \boxed{ 3 }", "3"),  # two boxes: the last one, stripped
    (r"\boxed {7}", "7"),
    (r"\fbox{B}", "B"),
    ("答案是 \\boxed{三角形}。", "三角形"),  # Chinese text
    ("no box here, 42", None),
    (r"truncated \boxed{\frac{1}{2}", None),  # the last box never closes: no final answer
    (r"\boxed{1} then truncated \boxed{2", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_final_answer_normalises_and_falls_back_to_text_after_think():
    assert final_answer("<think>x</think>\\boxed{\u22123}") == "-3"  # unicode minus
    assert final_answer("<think>x</think>\\boxed{\uff11\uff12}。") == "12"  # full-width digits
    assert final_answer("<think>2+2 is 4</think>  The answer is 4.  ") == "The answer is 4"


@pytest.mark.parametrize("pred, gold, equal", [
    (r"\frac{1}{2}", "0.5", True),
    ("0.5", r"\frac{1}{2}", True),
    ("x=3", "3", True),
    ("3", "x=3", True),
    ("\u22123", "-3", True),
    ("3", "-3", False),
    (r"\{1, 2\}", r"\{2,1\}", True),
    ("三角形", "三角形", True),  # not mathematics: compared as normalised text
    ("正方形", "三角形", False),
    ("", "0", False),
])
def test_math_equal(pred, gold, equal):
    assert math_equal(pred, gold) is equal


def test_math_equal_off_the_main_thread():
    """math-verify's SIGALRM timeouts only work on the main thread; reward workers may run in threads."""
    results = []
    thread = threading.Thread(target=lambda: results.append(math_equal(r"\frac{3}{4}", "0.75")))
    thread.start()
    thread.join()
    assert results == [True]


@pytest.mark.parametrize("response, answer, kind, reward", [
    ("<think>t</think>The answer is \\boxed{\\frac{1}{2}}", "0.5", "math", 1.0),
    ("<think>t</think>first \\boxed{2} then \\boxed{\\frac{3}{4}}", "0.75", "math", 1.0),
    ("<think>t</think>first \\boxed{0.75} then \\boxed{2}", "0.75", "math", 0.0),
    ("<think>t</think>\\boxed{-\\frac{1}{2}}", "\u22120.5", "math", 1.0),
    ("<think>t</think>\\boxed{B}", "B", "mcq", 1.0),
    ("<think>t</think>\\boxed{(C) red}", "C", "mcq", 1.0),
    ("<think>t</think>答案是B。", "B", "mcq", 1.0),
    ("<think>t</think>The answer is (D).", "(D)", "mcq", 1.0),
    ("<think>t</think>\\boxed{\uff22}", "B", "mcq", 1.0),  # full-width letter
    ("<think>t</think>\\boxed{A}", "B", "mcq", 0.0),
    ("<think>I see no option</think>none of them", "B", "mcq", 0.0),
    ("<think>t</think>There are \\boxed{3} circles", "3", "count", 1.0),
    ("<think>t</think>图中共有 5 个三角形。", "5", "count", 1.0),
    ("<think>t</think>\\boxed{1,000}", "1000", "count", 1.0),
    ("<think>t</think>\\boxed{4}", "3", "count", 0.0),
    ("<think>t</think>no idea", "3", "count", 0.0),
    ("3", "3", "count", 1.0),
])
def test_answer_reward_by_kind(response, answer, kind, reward):
    assert answer_reward(response, answer, kind) == reward


def test_open_kind_needs_a_judge_and_unknown_kinds_fail():
    judge = lambda question, response, answer: 0.75 if question == "q" and answer == "a" else 0.0
    assert answer_reward("<think>t</think>text", "a", "open", question="q", judge=judge) == 0.75
    with pytest.raises(ValueError, match="needs a judge"):
        answer_reward("x", "a", "open")
    with pytest.raises(ValueError, match="unknown prompt kind 'essay'"):
        answer_reward("x", "a", "essay")
    with pytest.raises(ValueError, match="names no option letter"):
        answer_reward("\\boxed{B}", "blue", "mcq")


def test_option_letter_ignores_words():
    assert option_letter("the answer is b") == "B"
    assert option_letter("Because") is None
    assert option_letter("A circle") is None
    assert option_letter("B: red") == "B" and option_letter("(c)") is None


@pytest.mark.parametrize("response, reward", [
    ("<think>reasoning</think>So \\boxed{3}.", 1.0),
    ("  <think>\n推理\n</think>\n答案是 \\boxed{三}", 1.0),
    ("<think>reasoning</think>So 3.", 0.0),  # no box
    ("<think>   </think>\\boxed{3}", 0.0),  # empty thinking
    ("\\boxed{3}", 0.0),  # no thinking
    ("<think>a</think><think>b</think>\\boxed{3}", 0.0),  # two think blocks
    ("<think>a \\boxed{3}</think>", 0.0),  # the box is inside the thinking
    ("<think>a</think>\\boxed{3", 0.0),  # unclosed box
    ("preamble <think>a</think>\\boxed{3}", 0.0),  # text before the thinking
])
def test_format_reward(response, reward):
    assert format_reward(response) == reward


def test_mixed_reward_weights():
    w = RewardWeights(answer=0.7, think=0.2, format=0.1)
    assert mixed_reward(1.0, 0.5, 0.0, w) == pytest.approx(0.8)
    assert mixed_reward(1.0, 1.0, 1.0, w) == pytest.approx(1.0)
    assert RewardWeights() == RewardWeights(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"sum to 1.*sum 1.1"):
        RewardWeights(answer=0.7, think=0.3, format=0.1)
    with pytest.raises(ValueError, match="must be >= 0"):
        RewardWeights(answer=1.2, think=-0.2, format=0.0)
