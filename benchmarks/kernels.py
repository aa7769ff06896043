"""Kernel benchmark: our Pallas packed attention and grouped matmul vs the XLA paths and JAX's library kernels.

On TPU/GPU it times the real shapes (attention: 8192 packed tokens, 4-30 documents per row; gmm: 16k tokens x top-8
onto 128 experts, 2048 -> 768) and prints times and ratios. On CPU the kernels can only run in interpret mode, so it
says so, shrinks the shapes and checks correctness (against our references and JAX's own kernels) instead of timing.

    PYTHONPATH=. python benchmarks/kernels.py [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import packed_attention
from pallas_kernels.moe import gmm, route
from pallas_kernels.moe.reference import reference_gmm, reference_route
from sail_jax.layers.attention import xla_attention


def bench(fn: Callable, *args, steps: int) -> float:
    """Median wall time (ms) of a jitted call after one warm-up (compile) call."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def packed_segments(rng: np.random.Generator, b: int, t: int, lo: int, hi: int) -> np.ndarray:
    """Each row holds between lo and hi documents of random length (a little padding at the end)."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        n = int(rng.integers(lo, hi + 1))
        cuts = np.sort(rng.choice(np.arange(1, t - 16), n - 1, replace=False))
        bounds = np.r_[0, cuts, t - int(rng.integers(0, 16))]
        for i in range(n):
            seg[r, bounds[i]:bounds[i + 1]] = i + 1
    return seg


def dense_mask(seg: jax.Array, causal: bool) -> jax.Array:
    m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    if causal:
        m &= jnp.tril(jnp.ones(m.shape[1:], bool))[None]
    return m[:, None]  # [B, 1, T, T]


def max_err(a, b, rows=None) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if rows is not None:
        a, b = a[rows], b[rows]
    return float(np.abs(a - b).max())


def attention_section(on_cpu: bool, steps: int) -> None:
    b, t, hq, hkv, d = (1, 256, 4, 2, 64) if on_cpu else (1, 8192, 16, 8, 128)
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
    seg = jnp.asarray(packed_segments(rng, b, t, 4, 4 if on_cpu else 30))
    real = np.asarray(seg) > 0
    ours = lambda q, k, v: packed_attention(q, k, v, segment_ids=seg)[0]
    xla = lambda q, k, v: xla_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)[0]
    # jax.nn's API has no segment ids: the packed mask must be dense [B,1,T,T] (what the kernel avoids)
    jnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense_mask(seg, True),
                                                       implementation=None if on_cpu else "cudnn")
    nseg = [len(np.unique(r[r > 0])) for r in np.asarray(seg)]
    print(f"attention: B={b} T={t} Hq={hq} Hkv={hkv} D={d} {jnp.dtype(dtype).name}, causal, segments/row={nseg}")
    if on_cpu:
        o, o_x, o_n = ours(q, k, v), xla(q, k, v), jnn(q, k, v)
        print(f"  max |ours - xla reference| = {max_err(o, o_x):.2e}")
        print(f"  max |ours - jax.nn.dot_product_attention| = {max_err(o, o_n, real):.2e} (non-padding rows)")
        _splash_check(q, k, v, seg, real)
        return
    fwd_bwd = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    rows = [("ours (pallas)", ours), ("xla reference", xla)]
    if jax.default_backend() == "gpu":
        rows.append(("jax.nn cudnn + dense mask", jnn))
        rows.append(("jax.nn cudnn causal only*", lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")))
    base = None
    for name, f in rows:
        try:
            tf, tb = bench(f, q, k, v, steps=steps), bench(fwd_bwd(f), q, k, v, steps=steps)
        except Exception as e:  # e.g. cuDNN refusing a shape: report, keep going
            print(f"  {name:28s} unavailable: {type(e).__name__}: {str(e)[:120]}")
            continue
        base = base or (tf, tb)
        print(f"  {name:28s} fwd {tf:8.2f} ms  fwd+bwd {tb:8.2f} ms  "
              f"(time / ours: x{tf / base[0]:.2f}, x{tb / base[1]:.2f})")
    if jax.default_backend() == "gpu":
        print("  * ignores the segments (attends across documents): a dense-causal speed reference, not equal output")
    print(f"  max |ours - xla reference| = {max_err(ours(q, k, v), xla(q, k, v)):.2e}")


def _splash_check(q, k, v, seg, real) -> None:
    """Outside reference: JAX's TPU splash attention (segment ids + causal mask) in interpret mode."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    kernel = splash.make_splash_mha_single_device(
        masks.MultiHeadMask([masks.CausalMask((t, t))] * hq),
        block_sizes=splash.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128), interpret=True)
    heads = lambda x: jnp.swapaxes(x, 0, 1)  # [T, H, D] -> [H, T, D]
    out = jax.vmap(lambda q, k, v, s: heads(kernel(heads(q) * d**-0.5, heads(jnp.repeat(k, g, 1)),
                                                   heads(jnp.repeat(v, g, 1)), segment_ids=splash.SegmentIds(s, s))))(
        q, k, v, seg)
    ours = packed_attention(q, k, v, segment_ids=seg)[0]
    print(f"  max |ours - splash attention (TPU interpret)| = {max_err(ours, out, real):.2e} (non-padding rows)")


def gmm_section(on_cpu: bool, steps: int) -> None:
    tokens, e, top_k, k_dim, n_dim = (64, 8, 2, 256, 128) if on_cpu else (16384, 128, 8, 2048, 768)
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((tokens, k_dim)), dtype)
    w = jnp.asarray(rng.standard_normal((e, k_dim, n_dim)) * k_dim**-0.5, dtype)
    _, _, gs, order = route(logits, top_k, norm_topk_prob=True)
    lhs = x[order // top_k]
    m = lhs.shape[0]
    print(f"gmm: M={m} (tokens {tokens} x top-{top_k}) K={k_dim} N={n_dim} G={e} {jnp.dtype(dtype).name}")
    if on_cpu:
        ref = reference_route(logits, top_k, norm_topk_prob=True)
        same = all(bool(jnp.array_equal(a, b)) for a, b in zip((gs, order), (ref[2], ref[3])))
        print(f"  routing kernel == softmax/top_k/argsort/bincount: {same}")
        ours = gmm(lhs, w, gs)
        print(f"  max |gmm - ragged_dot| = {max_err(ours, reference_gmm(lhs, w, gs)):.2e}")
        from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

        mb = megablox_gmm(lhs, w, gs, tiling=(64, 128, 128), interpret=True)
        print(f"  max |gmm - megablox gmm (interpret)| = {max_err(ours, mb):.2e}")
        return
    fwd_bwd = lambda f: jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32)), argnums=(0, 1))
    rows = [("ours (pallas gmm)", lambda a, b: gmm(a, b, gs)),
            ("jax.lax.ragged_dot", lambda a, b: jax.lax.ragged_dot(a, b, gs))]
    base = None
    flops = 2 * m * k_dim * n_dim
    for name, f in rows:
        tf, tb = bench(f, lhs, w, steps=steps), bench(fwd_bwd(f), lhs, w, steps=steps)
        base = base or (tf, tb)
        print(f"  {name:22s} fwd {tf:8.2f} ms ({flops / tf / 1e9:6.1f} TFLOP/s)  fwd+bwd {tb:8.2f} ms  "
              f"(time / ours: x{tf / base[0]:.2f}, x{tb / base[1]:.2f})")
    tr = bench(lambda z: route(z, top_k, norm_topk_prob=True), logits, steps=steps)
    trr = bench(lambda z: reference_route(z, top_k, norm_topk_prob=True), logits, steps=steps)
    print(f"  routing: kernel {tr:.3f} ms, jnp reference {trr:.3f} ms (x{trr / tr:.2f})")
    print(f"  max |gmm - ragged_dot| = {max_err(gmm(lhs, w, gs), jax.lax.ragged_dot(lhs, w, gs)):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    platform = jax.default_backend()
    on_cpu = platform == "cpu"
    print(f"platform: {platform} ({jax.devices()[0].device_kind})")
    if on_cpu:
        print("interpret mode: correctness only (no accelerator; small shapes, nothing is timed)")
    attention_section(on_cpu, args.steps)
    gmm_section(on_cpu, args.steps)


if __name__ == "__main__":
    main()
