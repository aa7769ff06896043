"""RL rollout throughput: n sampled completions of each prompt, our engine vs transformers `generate` with
`num_return_sequences`, same weights (the tiny test checkpoint's LLM), tokens/s of each and their ratio; then the time
split of one episode's rollout and its old-policy log-prob recompute by the trainer's forward, with the largest
difference between the engine's sampling log-probs and the recomputed ones.

Text prompts of random lengths (random token ids), pure sampling at temperature 1 (top-k and top-p off on both sides,
as DAPO samples), stop at `<|im_end|>` or `--new-tokens`, float32 on whatever device JAX / torch use here. Each side
runs once untimed first (compilation, allocator warm-up). Tokens counted are the ones each side returns up to and
including a stop token.

    python benchmarks/rl.py [--prompts 16] [--n 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks._twins import hf_generate, tiny_checkpoint  # noqa: E402
from sail_jax.config import IM_END_TOKEN_ID, PAD_TOKEN_ID, ModelConfig  # noqa: E402
from sail_jax.inference.engine import Completion, Engine, Request, bucket  # noqa: E402
from sail_jax.inference.sampling import SamplingParams  # noqa: E402
from sail_jax.models.sail_vl import SailVL  # noqa: E402
from sail_jax.training.step import lm_head_kernel  # noqa: E402


def response_lengths(tokens: np.ndarray) -> list[int]:
    """Tokens [rows, T] (transformers pads after the stop token): each row's length up to and including the stop."""
    return [int(np.argmax(row == IM_END_TOKEN_ID)) + 1 if (row == IM_END_TOKEN_ID).any() else len(row)
            for row in tokens]


def rollout(engine: Engine, prompts: list[np.ndarray], n: int, sampling: SamplingParams,
            logprobs: bool = False) -> tuple[float, list[Completion]]:
    """Seconds and completions of one rollout: prompt i's samples are rows i*n .. i*n+n-1 (seeded by row), the same
    array per group, so the engine prefills each prompt once; with `logprobs`, the sampling log-probs too."""
    requests = [Request(p, seed=i * n + j) for i, p in enumerate(prompts) for j in range(n)]
    start = time.perf_counter()
    out = engine.generate(requests, sampling, return_logprobs=logprobs)
    return time.perf_counter() - start, out


def logprob_program(model: SailVL, cfg: ModelConfig, rows_per_chunk: int = 8):
    """log softmax of each response token by the trainer's forward (`SailVL` over whole rows with `return_hidden`, as
    `training.step` runs it, then lm_head on the response positions, `rows_per_chunk` rows at a time)."""

    @jax.jit
    def logprobs(params, ids, positions, segment_ids, where, targets):
        hidden = model.apply(params, ids, positions=positions, segment_ids=segment_ids, return_hidden=True).hidden
        h = jnp.take_along_axis(hidden, where[..., None], axis=1)  # [R, T_resp, D]: the states that predict them
        kernel = lm_head_kernel(cfg, params["params"])

        def chunk(args):
            hc, tc = args
            logits = (hc @ kernel).astype(jnp.float32)
            return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tc[..., None], -1)[..., 0]

        r = h.shape[0] // rows_per_chunk
        split = lambda x: x.reshape(r, rows_per_chunk, *x.shape[1:])
        return jax.lax.map(chunk, (split(h), split(targets))).reshape(targets.shape)

    return logprobs


def logprob_batch(prompts: list[np.ndarray], n: int, responses: list[list[int]], new_tokens: int,
                  rows_per_chunk: int = 8) -> tuple[np.ndarray, ...]:
    """Right-padded rows prompt + response [R, T] (T bucketed), their positions and segment ids, the index of the
    state predicting each response token [R, new_tokens] and the targets (pad past a row's end)."""
    rows = len(responses)
    pad_rows = -rows % rows_per_chunk
    width = bucket(max(len(p) for p in prompts) + new_tokens)
    ids = np.full((rows + pad_rows, width), PAD_TOKEN_ID, np.int32)
    seg = np.zeros_like(ids)
    where = np.zeros((rows + pad_rows, new_tokens), np.int32)
    targets = np.full((rows + pad_rows, new_tokens), PAD_TOKEN_ID, np.int32)
    for r, resp in enumerate(responses):
        p = prompts[r // n]
        ids[r, :len(p)], ids[r, len(p):len(p) + len(resp)] = p, resp
        seg[r, :len(p) + len(resp)] = 1
        where[r] = np.minimum(len(p) - 1 + np.arange(new_tokens), width - 1)
        targets[r, :len(resp)] = resp
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape).copy()
    return ids, positions, seg, where, targets


def episode_time_split(engine: Engine, model: SailVL, cfg: ModelConfig, prompts: list[np.ndarray], n: int,
                       sampling: SamplingParams) -> dict[str, float]:
    """Seconds of one episode's parts that exist on this branch: the rollout (with the engine's sampling log-probs)
    and the old-policy log-prob recompute (compiled beforehand, as in a running loop), and the numerics health
    metric: max |engine log-prob - recomputed|. The updates need the RL loop (`sail-jax rl`), not here yet."""
    rollout(engine, prompts, n, sampling, logprobs=True)  # compile the log-prob variant
    seconds, out = rollout(engine, prompts, n, sampling, logprobs=True)
    responses = [c.token_ids for c in out]
    batch = logprob_batch(prompts, n, responses, sampling.max_new_tokens)
    program = logprob_program(model, cfg)
    jax.block_until_ready(program(engine.params, *batch))  # compile
    start = time.perf_counter()
    recomputed = np.asarray(program(engine.params, *batch))
    recompute_s = time.perf_counter() - start
    delta = max(float(np.abs(recomputed[r, :len(c.token_ids)] - c.logprobs).max()) for r, c in enumerate(out))
    return {"rollout": seconds, "log-prob recompute": recompute_s, "max |logp delta|": delta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts per rollout")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="most new tokens per sample")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(24, 96), help="prompt lengths drawn in [lo, hi]")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    hf, model, params, cfg = tiny_checkpoint()
    engine = Engine(model, params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, PAD_TOKEN_ID, rng.integers(args.prompt_len[0], args.prompt_len[1] + 1)).astype(np.int32)
               for _ in range(args.prompts)]
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    hf_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.n,
                     eos_token_id=IM_END_TOKEN_ID)
    rows = args.prompts * args.n
    print(f"tiny checkpoint LLM (hidden {cfg.llm.hidden_size}, {cfg.llm.num_layers} layers, vocab "
          f"{cfg.llm.vocab_size}); {args.prompts} prompts of {args.prompt_len[0]}-{args.prompt_len[1]} tokens x n="
          f"{args.n}, <= {args.new_tokens} new tokens, temperature 1; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}")

    rollout(engine, prompts, args.n, sampling)  # compile
    ours_s, ours = rollout(engine, prompts, args.n, sampling)
    ours_tokens = sum(len(c.token_ids) for c in ours)
    hf_generate(hf, prompts, 2, PAD_TOKEN_ID, **hf_kwargs)  # warm-up
    hf_s, hf_out = hf_generate(hf, prompts, args.new_tokens, PAD_TOKEN_ID, **hf_kwargs)
    assert hf_out.shape[0] == rows
    hf_tokens = sum(response_lengths(hf_out))
    for name, s, tokens in (("transformers", hf_s, hf_tokens), ("sail-jax", ours_s, ours_tokens)):
        print(f"{name:>12}: {rows} rollouts, {tokens} tokens in {s:.2f} s = {tokens / s:9.1f} tok/s")
    print(f"ratio sail-jax / transformers (rollout tokens/s): {ours_tokens / ours_s / (hf_tokens / hf_s):.2f}x "
          f"(goal >= 3x)")
    split = episode_time_split(engine, model, cfg, prompts, args.n, sampling)
    delta = split.pop("max |logp delta|")
    print("episode time split: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items())
          + f"; updates: not measured (the RL loop is not on this branch); max |sampling - recomputed log-prob| "
          f"{delta:.2e}")


if __name__ == "__main__":
    main()
