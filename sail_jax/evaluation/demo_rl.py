"""The RL demo behind `sail-jax demo-rl`: RL with verifiable rewards raising HELD-OUT accuracy on CPU.

`run_demo_rl` runs data -> weak SFT -> eval -> RL -> eval:
1. `make_demo_data` (the `sail-jax demo` data): SFT samples, a held-out question set and, from another seed, a
   disjoint set of RL prompts; both keep only count and colour questions (counts are verified by `count_reward`,
   colours by `exact_match`, the same normalised exact match as the held-out scoring).
2. A deliberately unfinished SFT (`configs/demo.gin` with a `sft_schedule` -step schedule, taken at step
   `sft_steps`, while its learning rate is still high): a model that reads counts and colours only partly, so
   sampling at temperature 1 finds right answers that greedy decoding misses — what RL can learn from. A model
   trained to the end of even a short schedule answers every question of a type alike, and RL then has nothing to
   learn from.
   (From a strong SFT model, RL only sharpened answers greedy decoding already picked: BUILD.md, "The RL loop".)
3. Greedy held-out accuracy of the SFT model (questions RL never sees).
4. `sail-jax rl` with `configs/rl/demo.gin` (DAPO: token-level clip 0.20/0.28, dynamic sampling) on the RL prompts.
5. Greedy held-out accuracy of the RL model, and `demo_rl_results.json` with both evaluations' predictions.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from sail_jax.evaluation.demo import DEMO_GIN, TOKENIZER, make_demo_data, read_qa_jsonl
from sail_jax.evaluation.scoring import score_item
from sail_jax.files import write_text_atomic
from sail_jax.resources import CONFIGS_DIR

RL_DEMO_GIN = CONFIGS_DIR / "rl" / "demo.gin"
TYPES = ("count", "color")


def exact_match(question: str, response: str, answer: str) -> float:
    """Judge callable (RewardConfig.judge) for colour answers: the held-out eval's normalised exact match."""
    del question
    return float(score_item("vqa", response, [answer])[0])


def _write_prompts(rows: list[dict[str, Any]], path: Path) -> int:
    """RL prompt JSONL ({"id", "image", "question", "answer", "kind"}) from demo QA rows of `TYPES`."""
    lines = [json.dumps({"id": r["id"], "image": r["image"], "question": r["question"], "answer": str(r["answer"]),
                         "kind": "count" if r["type"] == "count" else "open"}) for r in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _evaluate(step_dir: Path, rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    from converters.load import load_checkpoint
    from sail_jax.data.processor import SailProcessor
    from sail_jax.evaluation.demo import evaluate_qa
    from sail_jax.inference.engine import Engine
    from sail_jax.models.sail_vl import SailVL

    cfg, params = load_checkpoint(step_dir)
    processor = SailProcessor.from_dir(TOKENIZER, max_num=1, image_size=cfg.vision.image_size)
    t0 = time.time()
    result = evaluate_qa(Engine(SailVL(cfg), params), processor, rows, batch_size=64)
    per = ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in result["per_category"].items())
    print(f"[demo-rl] {label}: held-out greedy accuracy {result['accuracy']:.1%} ({result['correct']}/{result['n']}) "
          f"[{per}] in {time.time() - t0:.0f}s", flush=True)
    return result


def run_demo_rl(out: str | Path = "demo_rl_out", *, n: int = 3000, sft_steps: int = 60, sft_schedule: int = 100,
                episodes: int = 10, prompts_per_episode: int = 16, samples_per_prompt: int = 8,
                n_heldout: int = 1600, n_rl: int = 2400, seed: int = 0) -> dict[str, Any]:
    """Run every stage into `out/` (data/, rl_data/, sft/, rl/, demo_rl_results.json); returns the results.
    `n_heldout` / `n_rl` are demo samples drawn for the held-out set / the RL prompts (about a quarter of them give
    a count or colour question)."""
    from converters.orbax_io import resolve_checkpoint
    from sail_jax.rl import gin_setup as rl_gin
    from sail_jax.training import gin_setup as train_gin

    out = Path(out).resolve()
    t_start = time.time()
    if out.exists():  # a demo run always starts from scratch
        shutil.rmtree(out)
    data, rl_data = out / "data", out / "rl_data"
    make_demo_data(data, n=n, seed=seed, n_heldout=n_heldout)
    make_demo_data(rl_data, n=1, seed=seed + 1000, n_heldout=n_rl)  # a different seed: RL never sees held-out
    heldout = [r for r in read_qa_jsonl(data / "heldout_eval.jsonl") if r.get("type") in TYPES]
    n_prompts = _write_prompts([r for r in read_qa_jsonl(rl_data / "heldout_eval.jsonl") if r.get("type") in TYPES],
                               out / "rl_prompts.jsonl")
    print(f"[demo-rl] {n} SFT samples, {n_prompts} RL prompts, {len(heldout)} held-out count/colour questions",
          flush=True)

    t0 = time.time()
    train_gin.parse([str(DEMO_GIN)], [f"WORKDIR = '{out / 'sft'}'", f"grain_data.tokenizer_dir = '{TOKENIZER}'",
                                      f"grain_data.datasets = [{{'path': '{data / 'train.jsonl'}'}}]",
                                      f"train.seed = {seed}", f"train.steps = {max(sft_schedule, sft_steps)}",
                                      f"CheckpointConfig.every_steps = {sft_steps}",
                                      # every save of the schedule kept: step sft_steps must survive to the end
                                      f"CheckpointConfig.keep = {-(-max(sft_schedule, sft_steps) // sft_steps) + 1}"])
    with train_gin.run_workdir(str(out / "sft")):
        train_gin.train_using_gin()
    sft_seconds = time.time() - t0
    sft_step = out / "sft" / "checkpoints" / str(sft_steps)
    print(f"[demo-rl] SFT: step {sft_steps} of a {max(sft_schedule, sft_steps)}-step schedule in {sft_seconds:.0f}s",
          flush=True)
    before = _evaluate(sft_step, heldout, "after SFT (before RL)")

    rl_gin.parse([str(RL_DEMO_GIN)], [f"WORKDIR = '{out / 'rl'}'", f"PROMPTS = '{out / 'rl_prompts.jsonl'}'",
                                      f"rl.init_from = '{sft_step}'", f"rl.tokenizer_dir = '{TOKENIZER}'",
                                      f"rl.episodes = {episodes}", f"rl.prompts_per_episode = {prompts_per_episode}",
                                      f"rl.samples_per_prompt = {samples_per_prompt}", f"rl.seed = {seed}",
                                      f"CheckpointConfig.every_steps = {episodes}", "CheckpointConfig.keep = 1"])
    t0 = time.time()
    with train_gin.run_workdir(str(out / "rl")):
        rl_gin.rl_using_gin()
    rl_seconds = time.time() - t0
    print(f"[demo-rl] RL {episodes} episodes ({prompts_per_episode} prompts x {samples_per_prompt} samples) in "
          f"{rl_seconds:.0f}s", flush=True)
    after = _evaluate(Path(resolve_checkpoint(str(out / "rl"))), heldout, "after RL")

    m = len(heldout)
    # binomial standard error of one accuracy at this set size (the same questions before and after)
    stderr = math.sqrt(max(before["accuracy"] * (1 - before["accuracy"]), 1e-12) / max(m, 1))
    results = {
        "heldout_accuracy_before": before["accuracy"], "heldout_accuracy_after": after["accuracy"],
        "per_type_before": {k: v["accuracy"] for k, v in before["per_category"].items()},
        "per_type_after": {k: v["accuracy"] for k, v in after["per_category"].items()},
        "n_heldout": m, "accuracy_stderr": stderr, "n_rl_prompts": n_prompts, "sft_steps": sft_steps,
        "episodes": episodes, "rollouts_per_episode": prompts_per_episode * samples_per_prompt,
        "sft_seconds": round(sft_seconds, 1), "rl_seconds": round(rl_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
    }
    write_text_atomic(out / "demo_rl_results.json", json.dumps(
        {**results, "predictions_before": before["items"], "predictions_after": after["items"]}, indent=1))
    print(f"[demo-rl] held-out greedy accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} on {m} count/colour "
          f"questions never trained on (+-{stderr:.1%} one s.e.); {episodes} RL episodes in {rl_seconds:.0f}s, total "
          f"{results['total_seconds']:.0f}s; results in {out / 'demo_rl_results.json'}", flush=True)
    return results
