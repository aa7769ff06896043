"""RL rollout throughput: n sampled completions of each prompt, our engine vs transformers `generate` with
`num_return_sequences`, same weights (the tiny test checkpoint's LLM), tokens/s of each and their ratio; then the time
split of one DAPO episode (rollout / old-policy log-prob recompute by the trainer's forward / the optimizer updates,
with the RL loop's own functions), with the largest difference between the engine's sampling log-probs and the
recomputed ones.

Text prompts of random lengths (random token ids), pure sampling at temperature 1 (top-k and top-p off on both sides,
as DAPO samples), stop at `<|im_end|>` or `--new-tokens`, float32 on whatever device JAX / torch use here. Each side
runs once untimed first (compilation, allocator warm-up). Tokens counted are the ones each side returns up to and
including a stop token.

    python benchmarks/rl.py [--prompts 16] [--n 8] [--new-tokens 128] [--mini-batches 4] [--update-epochs 2]
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks._twins import hf_generate, tiny_checkpoint  # noqa: E402
from sail_jax.config import IM_END_TOKEN_ID, PAD_TOKEN_ID, ModelConfig  # noqa: E402
from sail_jax.inference.engine import Completion, Engine, Request  # noqa: E402
from sail_jax.inference.sampling import SamplingParams  # noqa: E402
from sail_jax.rl.advantages import group_advantages  # noqa: E402
from sail_jax.rl.learner import PolicyLossConfig, pack_sequences  # noqa: E402
from sail_jax.rl.loop import learner_functions, to_device  # noqa: E402
from sail_jax.sharding import use_mesh  # noqa: E402
from sail_jax.training.optim import OptimizerConfig  # noqa: E402
from sail_jax.training.step import TrainState  # noqa: E402


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


def episode_time_split(engine: Engine, cfg: ModelConfig, prompts: list[np.ndarray], n: int,
                       sampling: SamplingParams, mini_batches: int, update_epochs: int) -> dict[str, float]:
    """Seconds of one DAPO episode's parts, timed as `sail_jax.rl.loop` times them and with its functions
    (`learner_functions`, `pack_sequences`), each compiled beforehand as in a running loop: the rollout (with the
    engine's sampling log-probs), the old-policy log-prob recompute by the trainer's forward (pack, transfer and
    forward each mini-batch) and `update_epochs` passes of `mini_batches` optimizer steps (configs/rl/verifiable.gin:
    PolicyLossConfig defaults, AdamW at a constant 1e-6, adapter + LLM trainable), on group advantages of random 0/1
    rewards; and the numerics health metric: max |engine log-prob - recomputed|. The updates donate the engine's
    parameters: call it last."""
    rollout(engine, prompts, n, sampling, logprobs=True)  # compile the log-prob variant
    rollout_s, out = rollout(engine, prompts, n, sampling, logprobs=True)

    rows = len(out) // mini_batches
    prompt_len, response_len = max(len(p) for p in prompts), sampling.max_new_tokens
    opt = OptimizerConfig(learning_rate=1e-6, warmup_fraction=0.0, final_lr_fraction=1.0, weight_decay=0.0)
    updates = mini_batches * update_epochs
    program, update, logprob = learner_functions(cfg, opt, ("adapter", "llm"), PolicyLossConfig(),
                                                 sampling.temperature, updates + 1, None, rows,
                                                 prompt_len + response_len)
    rewards = np.random.default_rng(1).integers(0, 2, len(out)).astype(np.float32)
    adv = group_advantages(rewards, np.arange(len(out)) // n)
    image = cfg.vision.image_size

    def recompute(params) -> list[dict[str, jax.Array]]:
        minis = []
        for j in range(mini_batches):
            part = range(j * rows, (j + 1) * rows)
            host = pack_sequences([prompts[r // n] for r in part], [out[r].token_ids for r in part],
                                  [None] * rows, rows=rows, prompt_len=prompt_len, response_len=response_len,
                                  tile_slots=0, tile_shape=(3, image, image), pad_id=PAD_TOKEN_ID)
            host["advantages"] = adv[j * rows:(j + 1) * rows]
            dev = to_device(host, program.mesh)
            dev["old_logp"] = logprob(params, dev)
            minis.append(dev)
        return jax.block_until_ready(minis)

    with use_mesh(program.mesh):
        params = jax.device_put(engine.params["params"], program.shardings.params)
        state = TrainState(params, program.init_opt_state(params))
        recompute(state.params)  # compile
        start = time.perf_counter()
        minis = recompute(state.params)
        recompute_s = time.perf_counter() - start
        delta = max(float(np.abs(np.asarray(minis[r // rows]["old_logp"][r % rows, :len(c.token_ids)])
                                 - c.logprobs).max()) for r, c in enumerate(out) if c.token_ids)
        state, _ = update(state, minis[0], np.int32(0))  # compile
        jax.block_until_ready(state)
        start = time.perf_counter()
        metrics = []
        for step in range(updates):
            state, m = update(state, minis[step % mini_batches], np.int32(step + 1))
            metrics.append(m)
        metrics = jax.device_get(metrics)
        update_s = time.perf_counter() - start
    skipped = sum(float(m["skipped"]) for m in metrics)
    return {"rollout": rollout_s, "log-prob recompute": recompute_s, f"{updates} updates of {rows} rows": update_s,
            "max |logp delta|": delta, "skipped updates": skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts per rollout")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="most new tokens per sample")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(24, 96), help="prompt lengths drawn in [lo, hi]")
    ap.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per pass over the episode's rollouts")
    ap.add_argument("--update-epochs", type=int, default=2, help="passes over the episode's rollouts (DAPO: 2)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    if (args.prompts * args.n) % args.mini_batches:
        ap.error(f"{args.prompts * args.n} rollouts do not split into {args.mini_batches} mini-batches")
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
    split = episode_time_split(engine, cfg, prompts, args.n, sampling, args.mini_batches, args.update_epochs)
    delta, skipped = split.pop("max |logp delta|"), split.pop("skipped updates")
    print("episode time split: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items())
          + f" ({skipped:.0f} skipped); max |sampling - recomputed log-prob| {delta:.2e}")

if __name__ == "__main__":
    main()
