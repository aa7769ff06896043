"""Rollouts and their scores: n sampled completions per prompt by the KV-cache engine, then the verifiable / judge /
mixed reward of each.

Sampling randomness is a pure function of (`SamplingParams.seed`, the row's index in the round), so an episode
replays exactly after a resume. With `with_logprobs` the engine's own log-probs of the sampled tokens (log softmax
of its step logits at the sampling temperature, before top-p, computed on the device) come back too: compared with
the learner's recomputed ones they are a numerics health check of the two forward paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from sail_jax.data.processor import SailProcessor
from sail_jax.inference.engine import Engine, Request
from sail_jax.inference.sampling import SamplingParams
from sail_jax.inference.text import decode_response
from sail_jax.rl.advantages import overlong_penalty
from sail_jax.rl.prompts import RLPrompt
from sail_jax.rl.rewards import RewardWeights, answer_reward, format_reward, mixed_reward


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """A prompt ready for the engine and the learner: its request (token ids with the image tokens expanded, and
    its tiles or AnyRes patches)."""

    prompt: RLPrompt
    request: Request

    @property
    def input_ids(self) -> np.ndarray:
        return self.request.input_ids

    @property
    def pixel_values(self) -> np.ndarray | None:
        return self.request.pixel_values


@dataclasses.dataclass
class Rollout:
    """One sampled completion of `prompt` (group `group`: the completions of one prompt in one round)."""

    prompt: EncodedPrompt
    group: int
    response_ids: list[int]
    finish_reason: str
    text: str
    sample_logp: np.ndarray | None = None


def encode_prompt(processor: SailProcessor, prompt: RLPrompt, system: str | None = None) -> EncodedPrompt:
    """One user turn (images first, then the question) with the assistant turn opened, as `sail-jax chat` asks."""
    enc = processor.encode_conversation([{"role": "user", "content": prompt.question}],
                                        [str(p) for p in prompt.images], system=system, add_generation_prompt=True)
    return EncodedPrompt(prompt, Request.from_encoding(enc))


def generate_rollouts(engine: Engine, processor: SailProcessor, prompts: Sequence[EncodedPrompt], *, n: int,
                      sampling: SamplingParams, with_logprobs: bool = False) -> list[Rollout]:
    """n completions of each prompt (rows prompt-major: prompt i's samples are rows i*n .. i*n+n-1, group i)."""
    if n < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {n}")
    # the same arrays in each of a prompt's n requests: the engine prefills them once
    requests = [dataclasses.replace(p.request, seed=row) for row, p in enumerate(p for p in prompts for _ in range(n))]
    outs = engine.generate(requests, sampling, return_logprobs=with_logprobs)
    rollouts = []
    for row, out in enumerate(outs):
        logp = np.asarray(out.logprobs[:len(out.token_ids)], np.float32) if with_logprobs else None
        rollouts.append(Rollout(prompts[row // n], row // n, list(out.token_ids), out.finish_reason,
                                decode_response(processor.tokenizer, out.token_ids), logp))
    return rollouts


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The reward of a response: `weights` of the answer / think / format parts (mixed reward), plus DAPO's
    overlong shaping over the last `overlong_buffer` tokens before max_new_tokens (0: off). `judge` (import path
    "pkg.module:function" or an http(s) URL) scores "open" answers and, with weights.think > 0, think quality."""

    weights: RewardWeights = RewardWeights()
    overlong_buffer: int = 0
    overlong_factor: float = 1.0
    judge: str | None = None
    judge_timeout_s: float = 30.0
    judge_max_retries: int = 2


@dataclasses.dataclass
class Scores:
    """Per rollout [N]: the shaped reward the advantages use and its parts; `accuracy` (raw answer correctness)
    is what dynamic sampling filters on."""

    reward: np.ndarray
    accuracy: np.ndarray
    think: np.ndarray
    format: np.ndarray
    overlong: np.ndarray
    length: np.ndarray
    truncated: np.ndarray


def score_rollouts(rollouts: Sequence[Rollout], cfg: RewardConfig, max_new_tokens: int,
                   judge: Callable[[str, str, str], float] | None = None) -> Scores:
    """Score each rollout: answer correctness by kind, format, think quality (judge) and overlong shaping."""
    if cfg.weights.think and judge is None:
        raise ValueError("reward weights.think > 0 needs a judge (RewardConfig.judge)")
    acc, think, fmt = [], [], []
    for r in rollouts:
        p = r.prompt.prompt
        acc.append(answer_reward(r.text, p.answer, p.kind, question=p.question, judge=judge))
        think.append(float(judge(p.question, r.text, p.answer)) if cfg.weights.think else 0.0)
        fmt.append(format_reward(r.text))
    length = np.array([len(r.response_ids) for r in rollouts], np.int64)
    if cfg.overlong_buffer:
        over = overlong_penalty(length, max_len=max_new_tokens, buffer_len=cfg.overlong_buffer,
                                factor=cfg.overlong_factor)
    else:
        over = np.zeros(len(rollouts), np.float32)
    reward = np.array([mixed_reward(a, t, f, cfg.weights) for a, t, f in zip(acc, think, fmt, strict=True)])
    return Scores(reward=(reward + over).astype(np.float32), accuracy=np.asarray(acc, np.float32),
                  think=np.asarray(think, np.float32), format=np.asarray(fmt, np.float32), overlong=over,
                  length=length, truncated=np.array([r.finish_reason == "length" for r in rollouts]))
