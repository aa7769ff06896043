"""Benchmark metrics computed as VLMEvalKit computes them, from plain prediction rows; pure Python, no model.

A row is a mapping with VLMEvalKit's prediction-file columns (`index`, `question`, `answer`, `prediction`, `category`,
`l2-category`, option columns `A`, `B`, …, `image_path` …). An `answer` cell may hold a list, or a JSON / Python list
literal of the acceptable answers, as VLMEvalKit's TSVs store them. Scores are percentages (0-100) as VLMEvalKit and
the leaderboards print them; MME's subtask scores (0-200) and totals are MME points, OCRBench's final score is a count
of correct items (out of 1000 on the full set). LLM-judged benchmarks (MM-Vet) read the judge's 0-1 `score` column.
MMMU and MathVista answer extraction is in `extraction.py`.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sail_jax.evaluation.scoring import HME_CATEGORY, extract_choice, extract_yes_no, ocr_match

Row = Mapping[str, Any]

# ---------------------------------------------------------------------------------------------------- row access


def _where(row: Row, i: int) -> str:
    return f"row {i} (index {row.get('index', '?')})"


def is_blank(value: Any) -> bool:
    """An empty cell: None, NaN (how pandas writes an empty cell) or blank text."""
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan")


def prediction_of(row: Row) -> str:
    """The model's answer; a missing or NaN cell (VLMEvalKit's empty prediction) is the empty string."""
    value = row.get("prediction")
    return "" if is_blank(value) else str(value)


def list_cell(value: Any) -> list[str]:
    """A cell holding a list, a JSON / Python list literal, or one plain value, as a list of strings."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value)
    if text.lstrip().startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
    return [text]


def answers_of(row: Row, i: int = 0) -> list[str]:
    """The acceptable answers of a row; a missing `answer` names the row."""
    if "answer" not in row or row["answer"] is None:
        raise ValueError(f"{_where(row, i)}: missing key 'answer'")
    answers = list_cell(row["answer"])
    if not answers:
        raise ValueError(f"{_where(row, i)}: empty answer list")
    return answers


def options_of(row: Row) -> dict[str, str]:
    """The option columns `A`, `B`, … that hold text (VLMEvalKit leaves unused ones NaN)."""
    return {k: str(row[k]) for k in map(chr, range(ord("A"), ord("Z") + 1)) if k in row and not is_blank(row[k])}


def required_field(row: Row, key: str, i: int) -> Any:
    """row[key], or one error line naming the row when the cell is missing or empty."""
    if key not in row or is_blank(row[key]):
        raise ValueError(f"{_where(row, i)}: missing key {key!r}")
    return row[key]


def percent(hits: Sequence[float]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def percent_by(values: Iterable[tuple[Any, float]]) -> dict[str, float]:
    """Percent per group value, sorted by name (VLMEvalKit's per-category columns)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for key, hit in values:
        groups[str(key)].append(hit)
    return {k: percent(groups[k]) for k in sorted(groups)}


def report(rows: Sequence[Row], hits: Sequence[float]) -> dict[str, Any]:
    """Overall percent and, where rows carry them, percent per `category` and per `l2-category`."""
    out: dict[str, Any] = {"n": len(hits), "overall": percent(hits)}
    for key, name in (("category", "per_category"), ("l2-category", "per_l2_category")):
        pairs = [(row[key], hit) for row, hit in zip(rows, hits) if not is_blank(row.get(key))]
        if pairs:
            out[name] = percent_by(pairs)
    return out


# ---------------------------------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one item, as the DocVQA evaluation script (and VLMEvalKit) does.

    Strings are compared lowercased with whitespace runs collapsed; the distance is divided by the longer of the two
    raw strings; the best ground truth counts, and a similarity below `threshold` scores 0 (exactly 0.5 is kept).
    """
    det = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(gt, det) / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return 0.0 if similarity < threshold else similarity


def anls(rows: Iterable[Row]) -> dict[str, Any]:
    """DocVQA / InfoVQA: mean ANLS in percent, overall and per category."""
    rows = list(rows)
    return report(rows, [anls_score(prediction_of(r), answers_of(r, i)) for i, r in enumerate(rows)])


# ---------------------------------------------------------------------------------------------------- relaxed accuracy


def _relaxed_float(text: str) -> float | None:
    """A number, with a trailing percent sign read as hundredths ("45%" -> 0.45); else None."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: numbers within 5% of a non-zero target, otherwise case-insensitive equality.

    As VLMEvalKit (after pix2struct): only whole strings that parse as numbers are numbers, so "1,000" is text and
    "45%" equals 0.45 but not 45; a target of 0 needs an exact match.
    """
    pred = prediction.strip()
    pred_float = _relaxed_float(pred)
    for target in answers:
        target_float = _relaxed_float(target)
        if pred_float is not None and target_float:
            if abs(pred_float - target_float) / abs(target_float) <= tolerance:
                return True
        elif pred.lower() == target.lower():
            return True
    return False


def relaxed_accuracy(rows: Iterable[Row]) -> dict[str, Any]:
    """ChartQA: percent of items where the prediction relaxed-matches some answer, overall and per category."""
    rows = list(rows)
    return report(rows, [float(relaxed_match(prediction_of(r), answers_of(r, i))) for i, r in enumerate(rows)])


# ---------------------------------------------------------------------------------------------------- VQA accuracy

_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# The contracted forms the VQA evaluation restores; its table maps each form with exactly one apostrophe missing to it
# (answers are lowercased first, so its capitalised "I'm"-style entries never apply; its one reversed entry,
# "somebody'd" -> "somebodyd", is left out).
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
).split()
_CONTRACTIONS = {form[:k] + form[k + 1:]: form for form in _CONTRACTED for k, c in enumerate(form) if c == "'"}


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer normalisation, in VLMEvalKit's variant (applied to every answer and prediction).

    Punctuation marks are dropped when written next to a space or when the text has a thousands comma (so "1,000"
    becomes "1000"), else replaced by a space; periods not beside a digit go; then lowercase, number words
    "none".."ten" as digits, articles dropped, contractions written without apostrophe restored ("dont" -> "don't").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    squeeze = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        out = out.replace(p, "" if squeeze or p + " " in text or " " + p in text else " ")
    out = _LONE_PERIOD.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one item: min(1, #other humans agreeing / 3), averaged over leaving out each human answer.

    With TextVQA's 10 answers this is the official average over the 10 subsets of 9; one matching answer scores 0.3,
    two 0.6, three 0.9, four or more 1.0.
    """
    gts = [vqa_normalize(a) for a in answers]
    pred = vqa_normalize(prediction)
    matches = sum(g == pred for g in gts)
    per_left_out = [min(1.0, (matches - (g == pred)) / 3) for g in gts]
    return sum(per_left_out) / len(per_left_out)


def vqa_soft_accuracy(rows: Iterable[Row]) -> dict[str, Any]:
    """TextVQA: mean VQA accuracy in percent, overall and per category."""
    rows = list(rows)
    return report(rows, [vqa_soft_score(prediction_of(r), answers_of(r, i)) for i, r in enumerate(rows)])


# ---------------------------------------------------------------------------------------------------- multiple choice


def mcq_hit(row: Row, i: int = 0) -> bool:
    """The option letter read from the prediction is the answer letter."""
    choice = extract_choice(prediction_of(row), options_of(row))
    return choice is not None and choice == str(required_field(row, "answer", i)).strip().upper()


def mcq_accuracy(rows: Iterable[Row]) -> dict[str, Any]:
    """MMStar, AI2D: percent of questions answered with the right letter, overall, per category and l2-category."""
    rows = list(rows)
    return report(rows, [float(mcq_hit(r, i)) for i, r in enumerate(rows)])


def _int_index(row: Row, i: int) -> int:
    value = required_field(row, "index", i)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise ValueError(f"{_where(row, i)}: circular evaluation needs integer indices")
    return int(number)


def mmbench_circular(rows: Iterable[Row]) -> dict[str, Any]:
    """MMBench circular evaluation: a question counts only if every circularly shifted copy of it is right.

    Copies share `index % 1_000_000` with the original question (index below 1e6), as in VLMEvalKit's TSVs; copies
    whose original is absent are dropped, and categories are the original's. A file without copies scores as plain
    accuracy.
    """
    rows = list(rows)
    groups: dict[int, list[bool]] = defaultdict(list)
    main: dict[int, Row] = {}
    for i, row in enumerate(rows):
        index = _int_index(row, i)
        groups[index % 1_000_000].append(mcq_hit(row, i))
        if index < 1_000_000:
            main[index] = row
    order = sorted(main)
    out = report([main[g] for g in order], [float(all(groups[g])) for g in order])
    out["n_rows"] = sum(len(groups[g]) for g in order)
    return out


# ---------------------------------------------------------------------------------------------------- yes / no


def yn_hit(row: Row, i: int = 0) -> bool:
    said = extract_yes_no(prediction_of(row))
    return said is not None and said.lower() == str(required_field(row, "answer", i)).strip().lower()


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme(rows: Iterable[Row]) -> dict[str, Any]:
    """MME: per subtask acc (questions) + acc+ (images whose questions are all right), each in percent.

    `perception` and `cognition` sum the subtask scores (0-200 each) over MME's perception and cognition subtasks
    present in the rows (full maxima 2000 and 800). Images are told apart by `image_path`.
    """
    per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    n = 0
    for i, row in enumerate(rows):
        category = str(required_field(row, "category", i))
        per[category][str(required_field(row, "image_path", i))].append(yn_hit(row, i))
        n += 1
    subtasks = {}
    for category in sorted(per):
        images = per[category].values()
        acc = percent([h for hits in images for h in hits])
        acc_plus = percent([all(hits) for hits in images])
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "n": n,
        "perception": sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks),
        "cognition": sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks),
        "per_subtask": subtasks,
    }


def _hallusion_ids(row: Row, i: int) -> tuple[str, str, str]:
    """(set, figure, question) ids: explicit columns, else fields 3-5 of the `_`-separated index (VLMEvalKit)."""
    if all(not is_blank(row.get(k)) for k in ("set_id", "figure_id", "question_id")):
        return str(row["set_id"]), str(row["figure_id"]), str(row["question_id"])
    parts = str(required_field(row, "index", i)).split("_")
    if len(parts) < 6:
        raise ValueError(f"{_where(row, i)}: HallusionBench index needs 6 '_'-separated fields "
                         "(…_set_figure_question) or set_id/figure_id/question_id columns")
    return parts[3], parts[4], parts[5]


def _hallusion_scores(items: Sequence[tuple[str, tuple[str, str, str], bool]]) -> dict[str, float]:
    figures: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
    questions: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
    for l2, (set_id, figure_id, question_id), hit in items:
        figures[(l2, set_id, figure_id)].append(hit)
        questions[(l2, set_id, question_id)].append(hit)
    return {
        "aAcc": percent([hit for _, _, hit in items]),
        "fAcc": percent([all(h) for h in figures.values()]),
        "qAcc": percent([all(h) for h in questions.values()]),
    }


def hallusionbench(rows: Iterable[Row]) -> dict[str, Any]:
    """HallusionBench: aAcc over all questions, fAcc over figures (all questions about a figure right), qAcc over
    questions (all figure variants of a question right), in percent; groups are keyed by l2-category and set id as in
    VLMEvalKit. Also per category and per l2-category."""
    rows = list(rows)
    items = [(str(r.get("l2-category", "")), _hallusion_ids(r, i), yn_hit(r, i)) for i, r in enumerate(rows)]
    out: dict[str, Any] = {"n": len(items), **_hallusion_scores(items)}
    for key, name in (("category", "per_category"), ("l2-category", "per_l2_category")):
        groups: dict[str, list] = defaultdict(list)
        for row, item in zip(rows, items):
            if not is_blank(row.get(key)):
                groups[str(row[key])].append(item)
        if groups:
            out[name] = {k: _hallusion_scores(groups[k]) for k in sorted(groups)}
    return out


# ---------------------------------------------------------------------------------------------------- OCRBench

_TEXT_RECOGNITION = frozenset({"Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                               "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"})
OCRBENCH_GROUPS = ("Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                   HME_CATEGORY)


def ocrbench(rows: Iterable[Row]) -> dict[str, Any]:
    """OCRBench: `final_score` is the number of items whose prediction contains an answer (out of 1000 on the full
    set), with correct counts per OCRBench group (the six recognition categories summed as Text Recognition)."""
    rows = list(rows)
    counts = dict.fromkeys(OCRBENCH_GROUPS, 0)
    hits = []
    for i, row in enumerate(rows):
        category = str(required_field(row, "category", i))
        group = "Text Recognition" if category in _TEXT_RECOGNITION else category
        if group not in counts:
            raise ValueError(f"{_where(row, i)}: unknown OCRBench category {category!r}")
        hit = ocr_match(prediction_of(row), answers_of(row, i), category)
        counts[group] += hit
        hits.append(float(hit))
    return {"n": len(hits), "overall": percent(hits), "final_score": int(sum(hits)), "per_group": counts}


# ---------------------------------------------------------------------------------------------------- MM-Vet

MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")


def mmvet(rows: Iterable[Row]) -> dict[str, Any]:
    """MM-Vet: the mean LLM-judge `score` (0-1 per item) in percent, overall, per capability (the items whose
    `category` lists it, e.g. "ocr,math") and per capability combination (`,` written `_`), as VLMEvalKit reports."""
    rows = list(rows)
    scores = [float(required_field(r, "score", i)) for i, r in enumerate(rows)]
    categories = [str(required_field(r, "category", i)) for i, r in enumerate(rows)]
    capabilities = {cap: percent([s for s, c in zip(scores, categories) if cap in c]) for cap in MMVET_CAPABILITIES
                    if any(cap in c for c in categories)}
    return {"n": len(scores), "overall": percent(scores), "per_capability": capabilities,
            "per_category": percent_by((c.replace(",", "_"), s) for c, s in zip(categories, scores))}
