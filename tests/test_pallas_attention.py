"""Packed flash attention kernels vs the model's XLA attention and the kernel's jnp reference, in interpret mode on
CPU.

The Triton body runs under the generic interpreter, the Mosaic body under TPU interpret mode (simulated VMEM/SMEM
and DMAs); both are also lowered for their real targets ("tpu", "cuda") to check the lowerings accept them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention

from pallas_kernels.attention import packed_attention
from pallas_kernels.attention.blocks import Blocks, block_meta, choose_blocks
from pallas_kernels.attention.reference import reference_attention
from sail_jax.layers.attention import xla_attention
from tests.pallas_testing import assert_close, interpret_jit

F32, BF16 = jnp.float32, jnp.bfloat16


def xla_reference(q, k, v, *, segment_ids, causal: bool = True):
    """The model's XLA attention (what the kernel replaces), called like `packed_attention`."""
    return xla_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=causal)


def packed_segments(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    """Rows of random-length segments (crossing block edges), a padding gap mid-row and padding at the end."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        pos, sid = 0, 1
        while pos < t - 4:
            n = int(rng.integers(3, max(4, t // 3)))
            seg[r, pos:pos + n] = sid
            pos, sid = pos + n + (3 if sid == 2 else 0), sid + 1
        seg[r, t - 4:] = 0
    return seg


def make_inputs(seed, b, t, hq, hkv, d, dtype):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                  ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, hq, d)))
    wl = jnp.asarray(rng.standard_normal((b, t, hq)), F32)
    return q, k, v, jnp.asarray(packed_segments(rng, b, t)), w, wl


def out_lse_grads(fn, q, k, v, w, wl):
    """Forward (out, lse) and d/d(q, k, v) of a loss that weights both out and the finite part of lse."""

    def loss(q, k, v):
        o, lse = fn(q, k, v)
        value = jnp.sum(o.astype(F32) * w.astype(F32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * wl)
        return value, (o, lse)

    (_, (o, lse)), grads = interpret_jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, lse, grads


def check_against_reference(q, k, v, seg, w, wl, *, causal, tol, **kw):
    ours = out_lse_grads(lambda q, k, v: packed_attention(q, k, v, segment_ids=seg, causal=causal, **kw),
                         q, k, v, w, wl)
    # the reference runs in f32 on the same (possibly bf16-rounded) inputs
    up = lambda x: x.astype(F32)
    ref = out_lse_grads(lambda q, k, v: xla_reference(q, k, v, segment_ids=seg, causal=causal),
                        up(q), up(k), up(v), w, wl)
    o, lse, (dq, dk, dv) = ours
    ro, rlse, (rdq, rdk, rdv) = ref
    assert o.dtype == q.dtype and lse.dtype == F32 and o.shape == q.shape and lse.shape == q.shape[:3]
    lse, rlse = np.asarray(lse), np.asarray(rlse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse))
    assert np.isneginf(lse).any(), "the case should contain rows with no visible key"
    assert_close("out", o, ro, tol)
    np.testing.assert_array_equal(np.asarray(o)[np.isneginf(lse)], 0)
    assert_close("lse", np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(rlse), rlse, 0), tol)
    for name, g, rg in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert g.dtype == q.dtype
        assert_close(name, g, rg, tol)


# (dtype, causal, B, T, Hq, Hkv, D, block_q, block_k): GQA 1/2/4, D 64/128 (and 24: padded for Triton),
# T never a multiple of the blocks.
TRITON_CASES = {
    "f32-causal-gqa2-d64": (F32, True, 2, 72, 4, 2, 64, 16, 32),
    "f32-bidir-gqa4-d128": (F32, False, 1, 50, 4, 1, 128, 32, 16),
    "bf16-causal-mha-d128": (BF16, True, 1, 45, 2, 2, 128, 16, 16),
    "bf16-bidir-gqa2-d24": (BF16, False, 2, 40, 4, 2, 24, 16, 16),
}
TOL = {F32: 1e-5, BF16: 2e-2}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_body_matches_reference(case):
    dtype, causal, b, t, hq, hkv, d, bq, bk = TRITON_CASES[case]
    q, k, v, seg, w, wl = make_inputs(0, b, t, hq, hkv, d, dtype)
    check_against_reference(q, k, v, seg, w, wl, causal=causal, tol=TOL[dtype], backend="triton", interpret=True,
                            block_q=bq, block_k=bk)


MOSAIC_CASES = {
    "f32-causal-gqa2-d64": (F32, True, 1, 200, 4, 2, 64, 128, 128),
    "bf16-bidir-gqa2-d128": (BF16, False, 1, 150, 2, 1, 128, 128, 256),
}


@pytest.mark.parametrize("case", list(MOSAIC_CASES))
def test_mosaic_body_matches_reference(case):
    dtype, causal, b, t, hq, hkv, d, bq, bk = MOSAIC_CASES[case]
    q, k, v, seg, w, wl = make_inputs(1, b, t, hq, hkv, d, dtype)
    check_against_reference(q, k, v, seg, w, wl, causal=causal, tol=TOL[dtype], backend="mosaic", interpret=True,
                            block_q=bq, block_k=bk)


@pytest.mark.parametrize("backend,causal", [("triton", True), ("triton", False), ("mosaic", False)])
def test_masked_blocks_are_never_read(backend, causal):
    """NaN keys/values in blocks a query block cannot see must not reach it (0 * NaN would poison a computed tile).

    Causal: one segment, the second half poisoned (future blocks). Bidirectional: two segments, the second one
    poisoned (blocks outside the first segment's range).
    """
    t, block = (64, 16) if backend == "triton" else (256, 128)
    half = t // 2
    q, k, v, _, _, _ = make_inputs(2, 1, t, 2, 1, 64, F32)
    seg = np.ones((1, t), np.int32)
    if not causal:
        seg[:, half:] = 2
    seg = jnp.asarray(seg)
    poisoned = lambda x: x.at[:, half:].set(jnp.nan)
    run = interpret_jit(lambda q, k, v: packed_attention(q, k, v, segment_ids=seg, causal=causal, backend=backend,
                                                         interpret=True, block_q=block, block_k=block)[0])
    o = run(q, poisoned(k), poisoned(v))
    ref, _ = xla_reference(q, k, v, segment_ids=seg, causal=causal)
    assert_close("unpoisoned half", o[:, :half], ref[:, :half], 1e-5)
    assert np.isnan(np.asarray(o[:, half:])).all()  # the poison is real, and NaN inputs are not hidden


def test_block_metadata_skips_what_it_should():
    seg = jnp.asarray([[1] * 40 + [2] * 40 + [3] * 30 + [0] * 18])  # T = 128, blocks of 16 -> 8 x 8
    meta = jax.jit(block_meta, static_argnums=(1, 2))(seg, Blocks(16, 16), True)
    # q block 5 (rows 80..95) is all segment 3, whose keys start at row 80: exactly kv block 5
    assert (int(meta.kv_lo[0, 5]), int(meta.kv_hi[0, 5])) == (5, 5)
    # q block 2 (rows 32..47) straddles segments 1 and 2: kv blocks 0..2 (causal bound)
    assert (int(meta.kv_lo[0, 2]), int(meta.kv_hi[0, 2])) == (0, 2)
    # the last block is all padding: nothing to see, and nobody sees its keys
    assert int(meta.kv_hi[0, 7]) < int(meta.kv_lo[0, 7]) and int(meta.q_hi[0, 7]) < int(meta.q_lo[0, 7])
    bidir = jax.jit(block_meta, static_argnums=(1, 2))(seg, Blocks(16, 16), False)
    assert (int(bidir.kv_lo[0, 2]), int(bidir.kv_hi[0, 2])) == (0, 4)
    assert (int(bidir.q_lo[0, 6]), int(bidir.q_hi[0, 6])) == (5, 6)


def test_references_agree():
    q, k, v, seg, _, _ = make_inputs(3, 2, 40, 4, 2, 16, F32)
    for causal in (True, False):
        o1, l1 = interpret_jit(xla_reference, static_argnames="causal")(q, k, v, segment_ids=seg, causal=causal)
        o2, l2 = interpret_jit(reference_attention, static_argnames="causal")(q, k, v, segment_ids=seg, causal=causal)
        assert_close("out", o1, o2, 1e-5)
        np.testing.assert_array_equal(np.isneginf(l1), np.isneginf(l2))
        assert_close("lse", jnp.where(jnp.isfinite(l1), l1, 0), jnp.where(jnp.isfinite(l2), l2, 0), 1e-5)


def test_matches_jax_pallas_gpu_mha():
    """Outside reference: JAX's own Pallas-Triton `mha` with segment ids (interpret mode; MHA, T % block == 0)."""
    q, k, v, _, _, _ = make_inputs(4, 2, 64, 2, 2, 64, F32)
    seg = jnp.asarray(np.repeat(np.array([[1, 2, 3, 4], [1, 1, 2, 3]]), 16, axis=1).astype(np.int32))
    seg = seg.at[:, 5:30].set(seg[:, 5:30] + 10)  # segment edges off the block grid
    sizes = jax_gpu_attention.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_kv_dkv=16, block_q_dq=16,
                                         block_kv_dq=16)
    theirs = interpret_jit(lambda q, k, v: jax_gpu_attention.mha(q, k, v, seg, sm_scale=64**-0.5, causal=True,
                                                                 block_sizes=sizes, interpret=True))(q, k, v)
    ours = interpret_jit(lambda q, k, v: packed_attention(q, k, v, segment_ids=seg, causal=True, backend="triton",
                                                          interpret=True, block_q=16, block_k=16)[0])(q, k, v)
    assert_close("out vs jax mha", ours, theirs, 1e-5)


@pytest.mark.parametrize("backend,platform", [("mosaic", "tpu"), ("triton", "cuda")])
def test_lowers_for_the_real_target(backend, platform):
    """Forward and backward go through the real Pallas lowering (Mosaic MLIR / Triton IR) without hardware."""
    q = jax.ShapeDtypeStruct((2, 300, 8, 128), BF16)
    kv = jax.ShapeDtypeStruct((2, 300, 2, 128), BF16)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def loss(q, k, v, seg):
        o, lse = packed_attention(q, k, v, segment_ids=seg, backend=backend, interpret=False)
        return jnp.sum(o.astype(F32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    marker = "tpu_custom_call" if platform == "tpu" else "triton"
    assert text.count(marker) >= 3  # fwd, dq, dkv kernels


def test_default_blocks_follow_backend_rules():
    assert choose_blocks("mosaic", 8192, None, None) == Blocks(512, 512)
    assert choose_blocks("mosaic", 100, None, None) == Blocks(128, 128)
    assert choose_blocks("triton", 8192, None, None) == Blocks(64, 64)
    assert choose_blocks("triton", 20, None, None) == Blocks(32, 32)
    with pytest.raises(ValueError, match="multiples of 128"):
        choose_blocks("mosaic", 1024, 64, None)
    with pytest.raises(ValueError, match="powers of two"):
        choose_blocks("triton", 1024, 48, None)


def test_bad_inputs_raise_clear_errors():
    q = jnp.zeros((1, 8, 4, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        packed_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)), segment_ids=seg)
    with pytest.raises(ValueError, match="segment_ids shape"):
        packed_attention(q, kv, kv, segment_ids=jnp.ones((1, 9), jnp.int32))
    with pytest.raises(TypeError, match="dtypes differ"):
        packed_attention(q, kv.astype(BF16), kv, segment_ids=seg)
    with pytest.raises(TypeError, match="supported"):
        packed_attention(q.astype(jnp.int32), kv, kv, segment_ids=seg)
    with pytest.raises(TypeError, match="integers"):
        packed_attention(q, kv, kv, segment_ids=seg.astype(F32))
    with pytest.raises(ValueError, match="head_dim"):
        packed_attention(q, jnp.zeros((1, 8, 2, 8)), jnp.zeros((1, 8, 2, 8)), segment_ids=seg)
    with pytest.raises(ValueError, match="backend"):
        packed_attention(q, kv, kv, segment_ids=seg, backend="cuda")
