"""Pass@k filtering of RL prompts (paper §4.1.3): sample k answers per prompt with the current model, keep the
prompts it can learn from.

pass@k here is the fraction of the k sampled answers that are correct (the estimate of the model's pass rate on
the prompt). Reasoning kinds (by default "math" and "count") are kept when 0 < pass@k < 1: an always-solved prompt
teaches nothing and a never-solved one gives no reward signal. Other kinds only drop pass@k = 1 (already solved).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from sail_jax.data.processor import SailProcessor
from sail_jax.data.sources import BadSample, JsonlSource, decode_object
from sail_jax.files import parent_dir, write_text_atomic
from sail_jax.inference.engine import Engine
from sail_jax.inference.sampling import SamplingParams
from sail_jax.rl.prompts import RLPrompt, parse_prompt
from sail_jax.rl.rewards import answer_reward
from sail_jax.rl.rollout import encode_prompt, generate_rollouts

REASONING_KINDS = ("math", "count")


def keep_prompt(kind: str, pass_at_k: float, reasoning_kinds: Sequence[str] = REASONING_KINDS) -> bool:
    """0 < pass@k < 1 for reasoning kinds; pass@k < 1 for the others."""
    if kind in reasoning_kinds:
        return 0.0 < pass_at_k < 1.0
    return pass_at_k < 1.0


def read_records(path: str | Path, image_root: str | Path | None = None
                 ) -> tuple[list[tuple[dict, RLPrompt]], list[str]]:
    """(the raw JSON object and the parsed prompt of each usable line, the "file:line: why" of each bad line)."""
    source = JsonlSource(path)
    root = parent_dir(path) if image_root is None else image_root  # gs://... stays a URL (parse_prompt)
    good, bad = [], []
    for i in range(len(source)):
        record = source[i]
        try:
            good.append((decode_object(record.data), parse_prompt(record.data, root)))
        except BadSample as e:
            bad.append(f"{record.where}: {e}")
    return good, bad


def pass_rates(engine: Engine, processor: SailProcessor, prompts: Sequence[RLPrompt], *, k: int,
               sampling: SamplingParams, batch_prompts: int = 8,
               judge: Callable[[str, str, str], float] | None = None) -> Iterator[float]:
    """pass@k of each prompt, in order: the mean answer reward of k sampled answers (batch_prompts x k rows per
    engine call; seeds from `sampling.seed` and the batch index, so a run replays)."""
    for b, start in enumerate(range(0, len(prompts), batch_prompts)):
        chunk = [encode_prompt(processor, p) for p in prompts[start:start + batch_prompts]]
        rolls = generate_rollouts(engine, processor, chunk, n=k,
                                  sampling=SamplingParams(**{**sampling.__dict__, "seed": sampling.seed + b}))
        scores = np.array([answer_reward(r.text, r.prompt.prompt.answer, r.prompt.prompt.kind,
                                         question=r.prompt.prompt.question, judge=judge) for r in rolls])
        yield from scores.reshape(len(chunk), k).mean(axis=1).tolist()


def write_filtered(out: str | Path, scores_path: str | Path, records: Sequence[tuple[dict, RLPrompt]],
                   rates: Sequence[float], reasoning_kinds: Sequence[str] = REASONING_KINDS) -> int:
    """Write the kept records (each with its "pass_at_k") to `out` and every prompt's {id, kind, pass_at_k, kept}
    to `scores_path`, both atomically; returns how many were kept."""
    kept, scores = [], []
    for (raw, prompt), rate in zip(records, rates, strict=True):
        keep = keep_prompt(prompt.kind, rate, reasoning_kinds)
        scores.append({"id": raw["id"], "kind": prompt.kind, "pass_at_k": rate, "kept": keep})
        if keep:
            kept.append({**raw, "pass_at_k": rate})
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    write_text_atomic(scores_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scores))
    return len(kept)
