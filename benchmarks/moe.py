"""One Qwen3-MoE layer, forward + backward: dropless grouped dispatch vs every token through every expert.

    PYTHONPATH=$PWD python benchmarks/moe.py [--tokens 4096 --hidden 256 --inter 512 --experts 16 --top-k 2]

Both paths share the router, the load-balancing loss and the loss on the output; only the expert computation
differs. The dense path costs E/k times the grouped path's FLOPs, so the ratio is the payoff of dispatch. The
grouped path runs once per `--impls` entry; on XLA:CPU `ragged_dot` is expanded into a dense product over all
groups (see sail_jax/layers/grouped_matmul.py), so expect it to be the slowest there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.config import LLMConfig, MoEConfig, RuntimeConfig
from sail_jax.layers.moe import MoEBlock, route, routing_sums
from sail_jax.layers.moe_dispatch import all_experts_reference
from sail_jax.training.moe_loss import weighted_router_loss


def _timed(fn: Callable, args: tuple, iters: int) -> tuple[float, float]:
    """(compile + first run seconds, median seconds of `iters` further runs)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--impls", default="tiled,ragged_dot", help="grouped_matmul impls to time, comma-separated")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()

    moe = MoEConfig(num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.inter)
    cfg = LLMConfig(vocab_size=8, hidden_size=args.hidden, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                    moe=moe)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, args.tokens, args.hidden)), args.dtype)
    ct = jnp.asarray(rng.normal(size=x.shape), args.dtype)
    mask = jnp.ones(x.shape[:2], bool)
    params = nn.unbox(jax.jit(MoEBlock(cfg, RuntimeConfig(dtype=args.dtype)).init)(jax.random.PRNGKey(0), x, mask))

    def grouped_step(impl: str) -> Callable:
        block = MoEBlock(cfg, RuntimeConfig(dtype=args.dtype, moe_impl=impl))

        def loss(p, x):
            y, aux = block.apply(p, x, mask)
            return jnp.sum((y * ct).astype(jnp.float32)) + weighted_router_loss(aux, moe)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def dense_loss(p, x):
        p = p["params"]
        logits = x @ p["gate"]["kernel"].astype(x.dtype)
        probs, top_w, top_idx = route(logits, moe.num_experts_per_tok, moe.norm_topk_prob)
        ex = {k: v.astype(x.dtype) for k, v in p["experts"].items()}
        y = all_experts_reference(x[0], top_idx[0], top_w[0], ex["gate_proj"], ex["up_proj"], ex["down_proj"])
        aux = routing_sums(logits, probs, top_idx, mask, moe.num_experts)
        aux["dropped"] = jnp.zeros((), jnp.float32)
        return jnp.sum((y[None] * ct).astype(jnp.float32)) + weighted_router_loss(aux, moe)

    n, d, i, e, k = args.tokens, args.hidden, args.inter, args.experts, args.top_k
    print(f"devices: {jax.devices()[0].platform} x{jax.device_count()}  cpus: {os.cpu_count()}  "
          f"load avg before: {os.getloadavg()[0]:.2f}")
    print(f"one MoE layer fwd+bwd: tokens={n} D={d} I={i} E={e} top-{k} dtype={args.dtype}; expert GFLOP "
          f"(fwd+bwd) grouped {18 * n * k * d * i / 1e9:.1f}, dense {18 * n * e * d * i / 1e9:.1f}")
    dense = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))
    first, dense_t = _timed(dense, (params, x), args.iters)
    print(f"  dense all-experts        : {dense_t * 1e3:9.1f} ms  (first call {first:.1f} s)")
    ref_loss = float(dense(params, x)[0])
    for impl in [s for s in args.impls.split(",") if s]:
        step = grouped_step(impl)
        first, t = _timed(step, (params, x), args.iters)
        err = abs(float(step(params, x)[0]) - ref_loss) / max(abs(ref_loss), 1.0)
        print(f"  dropless grouped ({impl:10s}): {t * 1e3:9.1f} ms  (first call {first:.1f} s)  "
              f"dense/grouped = {dense_t / t:5.2f}x  rel. loss diff {err:.1e}")
    print(f"load avg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
