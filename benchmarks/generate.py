"""Decode throughput of the sail-jax engine vs transformers `generate`, same weights, greedy, KV cache on both sides.

A small Qwen3 LLM (no vision tower) on whatever device JAX / torch use here (the CPU by default). Decode speed is
measured as the extra tokens per extra second between a 1-token and an N-token generation, so the prompt's prefill
cancels out; the end-to-end time of the N-token run is printed too. The token sequences must agree (fp32, greedy).

    python benchmarks/generate.py [--new-tokens 128] [--prompt-len 64] [--batch 1] [--vocab 32000]
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

from benchmarks._twins import hf_generate, random_qwen3  # noqa: E402
from sail_jax.inference.engine import Engine, Request  # noqa: E402
from sail_jax.inference.sampling import SamplingParams  # noqa: E402


def time_hf(hf, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
    kwargs = dict(do_sample=False, eos_token_id=None, min_new_tokens=new_tokens)
    hf_generate(hf, list(prompts), new_tokens, 0, **kwargs)  # warm-up
    return hf_generate(hf, list(prompts), new_tokens, 0, **kwargs)


def time_ours(engine: Engine, prompts: np.ndarray, new_tokens: int) -> tuple[float, np.ndarray]:
    reqs = [Request(p) for p in prompts]
    sp = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())
    engine.generate(reqs, sp)  # compile
    start = time.perf_counter()
    out = engine.generate(reqs, sp)
    return time.perf_counter() - start, np.asarray([c.token_ids for c in out])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--decode-steps", type=int, default=8, help="engine tokens per device call")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    hf, lm, params = random_qwen3(args.vocab)
    engine = Engine(lm, params, decode_steps=args.decode_steps)
    prompts = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt_len))
    n = args.new_tokens
    print(f"Qwen3 hidden 256, 4 layers, vocab {args.vocab}; batch {args.batch}, prompt {args.prompt_len}, "
          f"{n} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    results = {}
    for name, fn, model in (("transformers", time_hf, hf), ("sail-jax", time_ours, engine)):
        t1, _ = fn(model, prompts, 1)
        tn, tokens = fn(model, prompts, n)
        decode = args.batch * (n - 1) / max(tn - t1, 1e-9)
        results[name] = (decode, tokens)
        print(f"{name:>12}: decode {decode:9.1f} tok/s   end-to-end {args.batch * n / tn:9.1f} tok/s "
              f"({tn * 1000:.0f} ms for {n} tokens)")
    same = np.array_equal(results["transformers"][1], results["sail-jax"][1])
    print(f"ratio sail-jax / transformers (decode): {results['sail-jax'][0] / results['transformers'][0]:.2f}x; "
          f"greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
