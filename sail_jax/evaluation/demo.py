"""The demo behind `make demo`: synthetic shapes data, held-out QA scoring, and the end-to-end run, all on CPU.

`run_demo` runs data -> eval -> train -> eval -> plot -> export:
1. `make_demo_data`: deterministic coloured-shape images with captions and VQA (train, held-out, eval questions).
2. Answer accuracy of the untrained model on the held-out questions (the baseline).
3. Training from `configs/demo.gin` (the gin trainer, Grain pipeline with stream + visual packing, Orbax
   checkpoints) — the same code path as a pod run, at toy scale.
4. Answer accuracy of the trained model on the same held-out questions.
5. The loss curve (PNG) and the trained model exported to the upstream Hugging Face layout.

The data is LLaVA JSONL (`train.jsonl`, held-out `heldout.jsonl`) plus `heldout_eval.jsonl`, one direct question per
line with a single canonical answer word ({"id", "image": [paths], "question", "answer", "type"}) for answer-
accuracy scoring. Everything is drawn from one seeded generator, so the same seed gives byte-identical files.

Small on purpose, so a tiny model trained from scratch learns it on a CPU in minutes: 5 colours, 3 shapes, square
images (one tile each) with one large shape (70%) or 2–4 shapes on a 2x2 grid, answers from a closed vocabulary
(colours, shapes, "0"–"4", left/right/top/bottom, yes/no, first/second). Sample kinds (`KIND_CYCLE`): single-
image QA (some two-turn), captions, two-image questions, CoT answers (`<think>…</think>\\boxed{…}` after the CoT
instruction) and a few text-only questions.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from sail_jax.data.chat import with_thinking
from sail_jax.evaluation.scoring import score_item, summarize
from sail_jax.jsonl import iter_jsonl
from sail_jax.resources import CONFIGS_DIR, TOKENIZER_DIR

if TYPE_CHECKING:
    from sail_jax.data.processor import SailProcessor
    from sail_jax.inference.engine import Engine

DEMO_GIN = CONFIGS_DIR / "demo.gin"
TOKENIZER = TOKENIZER_DIR

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((448, 448), (336, 336), (224, 224))  # square: one tile each, shapes undistorted at any max_num
# A lone shape sits off-centre at one of these spots (fractions of the image) and is large (over a third of the
# short side across): with one tile per image it still covers many patches, which a small model trained from
# scratch needs to learn to see it in minutes.
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
# How captions and CoT thoughts say where a lone shape is: position is the property the demo's LLM learns to read
# last, so every text that can name it does.
WHERE = {"left": " on the left", "right": " on the right", "top": " at the top", "bottom": " at the bottom", None: ""}
# Cells (x, y) of multi-shape scenes, as fractions of the image: a 2x2 grid.
CELLS = tuple((x, y) for y in (0.25, 0.75) for x in (0.25, 0.75))
SUFFIX = "\nAnswer the question using a single word or phrase."
NUMBERS = ("zero", "one", "two", "three", "four")
# Each block of 20 samples has this mix of kinds in a random order (60% QA, 10% captions, 10% two-image, 15% CoT,
# 5% text-only), so even a small set has every kind.
KIND_CYCLE = ("qa",) * 12 + ("caption",) * 2 + ("multi",) * 2 + ("cot",) * 3 + ("text",)
TEXT_ONLY = (("Which shape has three corners?", "triangle"), ("Which shape has four equal sides?", "square"),
             ("Which shape has no corners?", "circle"))


def random_scene(rng: np.random.Generator, n_shapes: int, single_position: bool) -> dict[str, Any]:
    """A scene description: one shape at a `POSITIONS` spot (`single_position`) or `n_shapes` on the 2x2 grid."""
    w, h = SIZES[rng.integers(len(SIZES))]
    if single_position:
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        spots = [POSITIONS[position]]
    else:
        position = None
        # in reading order (top row first, left to right), so a caption's list of shapes is a function of the image
        spots = [CELLS[i] for i in sorted(rng.choice(len(CELLS), n_shapes, replace=False))]
    radius = (0.18, 0.24) if single_position else (0.15, 0.22)
    shapes = []
    for fx, fy in spots:
        shapes.append({"shape": SHAPES[rng.integers(len(SHAPES))], "color": list(COLORS)[rng.integers(len(COLORS))],
                       "cx": fx * w, "cy": fy * h, "r": float(min(w, h) * rng.uniform(*radius))})
    bg = tuple(int(v) for v in rng.integers(225, 256, 3))
    return {"size": (int(w), int(h)), "bg": bg, "shapes": shapes, "position": position}


def draw_scene(scene: dict[str, Any]) -> Image.Image:
    image = Image.new("RGB", scene["size"], scene["bg"])
    draw = ImageDraw.Draw(image)
    for s in scene["shapes"]:
        cx, cy, r, fill = s["cx"], s["cy"], s["r"], COLORS[s["color"]]
        if s["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(((cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)), fill=fill)
    return image


def _phrase(shapes: list[dict[str, Any]]) -> str:
    parts = [f"a {s['color']} {s['shape']}" for s in shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _questions(scene: dict[str, Any], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Every (question, answer, type) the scene answers unambiguously."""
    shapes = scene["shapes"]
    kinds = [s["shape"] for s in shapes]
    colors = [s["color"] for s in shapes]
    out = [("How many shapes are there?", str(len(shapes)), "count")]
    color = list(COLORS)[rng.integers(len(COLORS))]
    out.append((f"How many {color} shapes are there?", str(colors.count(color)), "count"))
    out += [(f"What color is the {k}?", s["color"], "color") for k, s in zip(kinds, shapes) if kinds.count(k) == 1]
    out += [(f"What shape is the {c} object?", s["shape"], "shape") for c, s in zip(colors, shapes)
            if colors.count(c) == 1]
    if scene["position"]:
        s = shapes[0]
        out.append((f"Where is the {s['color']} {s['shape']}?", scene["position"], "position"))
    ask_shape, ask_color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
    present = any(s["shape"] == ask_shape and s["color"] == ask_color for s in shapes)
    out.append((f"Is there a {ask_color} {ask_shape}?", "yes" if present else "no", "yesno"))
    return out


class _Writer:
    """Draws scenes into `images/` and numbers them; image paths in records are relative to the output dir."""

    def __init__(self, out: Path, split: str, rng: np.random.Generator):
        self.out, self.split, self.rng, self.count = out, split, rng, 0
        (out / "images").mkdir(parents=True, exist_ok=True)

    def image(self, scene: dict[str, Any]) -> str:
        rel = f"images/{self.split}_{self.count:05d}.png"
        self.count += 1
        draw_scene(scene).save(self.out / rel, format="PNG")
        return rel

    def scene(self, single: bool | None = None) -> dict[str, Any]:
        single = bool(self.rng.random() < 0.7) if single is None else single
        n = 1 if single else int(self.rng.integers(2, 5))
        return random_scene(self.rng, n, single)


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def _make_sample(w: _Writer, sample_id: str, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One LLaVA record of the given kind and its eval items (direct single-answer questions only)."""
    rng = w.rng
    if kind == "text":
        q, a = TEXT_ONLY[rng.integers(len(TEXT_ONLY))]
        return {"id": sample_id, "conversations": _turns((q + SUFFIX, a))}, [
            {"id": sample_id, "image": [], "question": q + SUFFIX, "answer": a, "type": "text"}]
    if kind == "multi":
        a, b = w.scene(single=True), w.scene(single=True)
        while b["shapes"][0]["shape"] == a["shapes"][0]["shape"]:
            b["shapes"][0]["shape"] = SHAPES[rng.integers(len(SHAPES))]
        paths = [w.image(a), w.image(b)]
        which = int(rng.integers(2))
        questions = [(f"Which image shows a {(a, b)[which]['shapes'][0]['shape']}? Answer first or second.",
                      ("first", "second")[which], "multi"),
                     (f"What color is the shape in the {('first', 'second')[which]} image?",
                      (a, b)[which]["shapes"][0]["color"], "multi")]
        q, ans, qtype = questions[rng.integers(2)]
        question = "Image-1: <image>\nImage-2: <image>\n" + q + SUFFIX
        return {"id": sample_id, "image": paths, "conversations": _turns((question, ans))}, [
            {"id": sample_id, "image": paths, "question": question, "answer": ans, "type": qtype}]
    scene = w.scene()
    path = w.image(scene)
    where = WHERE[scene["position"]]
    if kind == "caption":
        n = len(scene["shapes"])
        text = f"The image shows {NUMBERS[n]} shape{'s' if n > 1 else ''}: {_phrase(scene['shapes'])}{where}."
        return {"id": sample_id, "image": path, "conversations": _turns(("<image>\nDescribe the image.", text))}, []
    options = _questions(scene, rng)
    if kind == "cot":
        n = len(scene["shapes"])
        thought = f"The shapes: {_phrase(scene['shapes'])}{where}. That is {n}."
        question = with_thinking("<image>\nHow many shapes are there?")
        answer = f"<think>\n{thought}\n</think>\n\\boxed{{{n}}}"
        return {"id": sample_id, "image": path, "conversations": _turns((question, answer))}, []
    # question types equally often (a lone shape has one "color" question but both "count" ones), then one
    # question of each picked type
    types = sorted({t for _, _, t in options})
    chosen = rng.choice(len(types), min(len(types), 1 + int(rng.random() < 0.3)), replace=False)
    picks = []
    for i in chosen:
        of_type = [k for k, o in enumerate(options) if o[2] == types[i]]
        picks.append(of_type[rng.integers(len(of_type))])
    pairs = [(options[i][0] + SUFFIX, options[i][1]) for i in picks]
    pairs[0] = ("<image>\n" + pairs[0][0], pairs[0][1])
    evals = [{"id": sample_id, "image": [path], "question": "<image>\n" + options[picks[0]][0] + SUFFIX,
              "answer": options[picks[0]][1], "type": options[picks[0]][2]}]
    return {"id": sample_id, "image": path, "conversations": _turns(*pairs)}, evals


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_demo_data(out: str | Path, n: int, seed: int = 0, n_heldout: int | None = None) -> dict[str, int]:
    """Write the demo set into `out`; returns the record counts per file."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n_heldout = max(1, n // 10) if n_heldout is None else n_heldout
    out = Path(out)
    counts = {}
    for split, count, offset in (("train", n, 0), ("heldout", n_heldout, 1)):
        w = _Writer(out, split, np.random.default_rng([seed, offset]))
        records, evals = [], []
        blocks = -(-count // len(KIND_CYCLE))
        kinds = [k for _ in range(blocks) for k in w.rng.permutation(KIND_CYCLE)]
        for i in range(count):
            record, items = _make_sample(w, f"{split}-{i:05d}", str(kinds[i]))
            records.append(record)
            evals += items
        _write_jsonl(out / f"{split}.jsonl", records)
        counts[f"{split}.jsonl"] = len(records)
        if split == "heldout":
            _write_jsonl(out / "heldout_eval.jsonl", evals)
            counts["heldout_eval.jsonl"] = len(evals)
    return counts


def read_qa_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows with image paths made absolute (relative to the file); errors name the file and line."""
    path = Path(path)
    rows = []
    for n, row in iter_jsonl(path):
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing key(s) {missing}")
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        rows.append({**row, "image": [str(path.parent / p) for p in images], "line": n})
    return rows


def evaluate_qa(
    engine: Engine, processor: SailProcessor, rows: Sequence[dict[str, Any]], batch_size: int = 16,
    max_new_tokens: int = 8,
) -> dict[str, Any]:
    """Accuracy overall and per `type`, and every prediction: greedy answers scored by normalised exact match."""
    from sail_jax.inference.engine import Request
    from sail_jax.inference.sampling import SamplingParams
    from sail_jax.inference.text import decode_response

    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        encoded = [processor(images=r["image"], prompt=r["question"]) for r in batch]
        requests = [Request.from_encoding(e) for e in encoded]
        for row, out in zip(batch, engine.generate(requests, sampling), strict=True):
            prediction = decode_response(processor.tokenizer, out.token_ids)
            correct, _ = score_item("vqa", prediction, [str(row["answer"])])
            records.append({"id": row.get("id"), "category": row.get("type"), "question": row["question"],
                            "answer": row["answer"], "prediction": prediction, "correct": correct})
    return {**summarize(records), "items": records}


def _evaluate(cfg: Any, params: Any, processor: Any, rows: list[dict], label: str) -> dict[str, Any]:
    from sail_jax.inference.engine import Engine
    from sail_jax.models.sail_vl import SailVL

    t0 = time.time()
    result = evaluate_qa(Engine(SailVL(cfg), params), processor, rows)
    per = ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in result["per_category"].items())
    print(f"[demo] {label}: answer accuracy {result['accuracy']:.1%} ({result['correct']}/{result['n']}) "
          f"[{per}] in {time.time() - t0:.0f}s", flush=True)
    return result


def run_demo(out: str | Path = "demo_out", n: int = 3000, seed: int = 0, steps: int | None = None,
             export: bool = True, n_heldout: int = 1500) -> dict[str, Any]:
    """Run every stage into `out/` (data/, run/, loss.png, hf/, demo_results.json); returns the results."""
    import gin
    import jax

    from sail_jax.data.processor import SailProcessor
    from sail_jax.evaluation.plot import plot_loss
    from sail_jax.models.sail_vl import SailVL, dummy_inputs
    from sail_jax.training import gin_setup

    out = Path(out).resolve()
    data, workdir = out / "data", out / "run"
    t_start = time.time()
    print(f"[demo] writing {n} synthetic samples to {data}", flush=True)
    counts = make_demo_data(data, n=n, seed=seed, n_heldout=n_heldout)
    print(f"[demo] {counts}", flush=True)

    bindings = [f"WORKDIR = '{workdir}'", f"grain_data.datasets = [{{'path': '{data / 'train.jsonl'}'}}]",
                f"grain_data.tokenizer_dir = '{TOKENIZER}'", f"train.seed = {seed}"]
    if steps is not None:
        bindings.append(f"train.steps = {steps}")
    gin_setup.parse([str(DEMO_GIN)], bindings)
    cfg = gin_setup.model_config(**gin.get_bindings("model_config"))
    data_opts = gin.get_bindings("grain_data")
    processor = SailProcessor.from_dir(TOKENIZER, max_num=data_opts.get("max_num", 12),
                                       image_size=cfg.vision.image_size)
    rows = read_qa_jsonl(data / "heldout_eval.jsonl")

    ids, pix = dummy_inputs(cfg)
    untrained = jax.jit(SailVL(cfg).init)(jax.random.PRNGKey(seed), ids, pix)
    before = _evaluate(cfg, untrained, processor, rows, "before training")
    del untrained

    if workdir.exists():  # a demo run always starts from scratch
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "config.gin").write_text(gin.config_str())
    t0 = time.time()
    last = gin_setup.train_using_gin()
    train_seconds = time.time() - t0
    print(f"[demo] trained in {train_seconds:.0f}s: last metrics loss {last.get('loss', float('nan')):.4f}",
          flush=True)

    from converters.load import load_checkpoint

    step_dir = max((workdir / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    trained_cfg, params = load_checkpoint(step_dir)
    after = _evaluate(trained_cfg, params, processor, rows, "after training")

    plot, _ = plot_loss(workdir, out / "loss.png")
    print(f"[demo] loss curve: {plot}", flush=True)
    hf_dir = None
    if export:
        from converters.convert import orbax_to_hf

        hf_dir = out / "hf"
        orbax_to_hf(step_dir, hf_dir, tokenizer=TOKENIZER, overwrite=True, progress=False)
        print(f"[demo] exported the trained model to the upstream layout: {hf_dir}", flush=True)

    results = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "per_type_after": {k: v["accuracy"] for k, v in after["per_category"].items()},
        "n_eval": after["n"], "train_seconds": round(train_seconds, 1), "train_steps": int(step_dir.name),
        "final_loss": last.get("loss"), "checkpoint": str(step_dir), "hf_export": str(hf_dir) if hf_dir else None,
        "total_seconds": round(time.time() - t_start, 1),
    }
    (out / "demo_results.json").write_text(json.dumps({**results, "predictions_after": after["items"]}, indent=1))
    print(f"[demo] answer accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} on {after['n']} held-out "
          f"questions; total {results['total_seconds']:.0f}s; results in {out / 'demo_results.json'}", flush=True)
    return results
