"""MoE kernels vs references, in interpret mode on CPU: gmm (with its tgmm backward) vs `jax.lax.ragged_dot`
(values and gradients), routing vs softmax/top_k/argsort/bincount (values and gradients), and the two composed the
way an MoE layer uses them.

Group sizes are runtime values, so one compiled kernel per (backend, dtype) serves every group-size pattern.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import gmm, route
from pallas_kernels.moe.reference import reference_gmm, reference_route, reference_tgmm
from pallas_kernels.moe.schedule import Tiling, choose_tiling, group_bounds, visits
from tests.pallas_testing import assert_close, interpret_jit

F32, BF16 = jnp.float32, jnp.bfloat16
T, E, TOP_K = 30, 8, 3
M, K, N = T * TOP_K, 40, 48  # 90 rows; no dim a multiple of any tile
TILING = {"triton": (16, 16, 32), "mosaic": (16, 128, 128)}
GROUP_SIZES = {
    "mixed-with-empty": [20, 0, 13, 17, 0, 9, 25, 6],
    "all-in-one-group": [0, 0, 0, 90, 0, 0, 0, 0],
    "partial-sum-and-empty-ends": [0, 7, 1, 30, 19, 0, 5, 0],  # rows 62.. belong to no group
    "all-empty": [0] * 8,
}
TOL = {F32: 1e-5, BF16: 2e-2}


@functools.cache
def _kernels(backend: str):
    """jit(gmm and its gradients) for one backend, compiled once per dtype."""
    kw = dict(backend=backend, interpret=True, tiling=TILING[backend])

    def run(lhs, rhs, gs, dout):
        out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, **kw), lhs, rhs)
        return out, *vjp(dout)

    return interpret_jit(run)


def _reference(lhs, rhs, gs, dout):
    out, vjp = jax.vjp(lambda a, b: reference_gmm(a, b, gs), lhs, rhs)
    return out, *vjp(dout)


def _operands(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((M, K)), dtype), jnp.asarray(rng.standard_normal((E, K, N)), dtype),
            jnp.asarray(rng.standard_normal((M, N)), dtype))


@pytest.mark.parametrize("backend,dtype", [("triton", F32), ("triton", BF16), ("mosaic", F32)])
def test_gmm_and_grads_match_ragged_dot(backend, dtype):
    lhs, rhs, dout = _operands(dtype)
    run = _kernels(backend)
    for name, sizes in GROUP_SIZES.items():
        gs = jnp.asarray(sizes, jnp.int32)
        got = run(lhs, rhs, gs, dout)
        want = _reference(*(x.astype(F32) for x in (lhs, rhs)), gs, dout.astype(F32))
        for what, g, w in zip(("gmm", "dlhs", "drhs"), got, want, strict=True):
            assert g.dtype == dtype, f"{name}/{what}: dtype {g.dtype}"
            assert_close(f"{name}/{what}", g, w, TOL[dtype])
        # drhs is the tgmm kernel: also against a reference independent of ragged_dot's own VJP
        assert_close(f"{name}/tgmm", got[2], reference_tgmm(lhs.astype(F32), dout.astype(F32), gs), TOL[dtype])
        total = sum(sizes)
        np.testing.assert_array_equal(np.asarray(got[0])[total:], 0)  # rows past sum(group_sizes)
        np.testing.assert_array_equal(np.asarray(got[2])[np.asarray(sizes) == 0], 0)  # empty groups


def test_preferred_element_type_and_drop_in_signature():
    lhs, rhs, _ = _operands(BF16, seed=1)
    gs = jnp.asarray(GROUP_SIZES["mixed-with-empty"], jnp.int32)
    out = interpret_jit(lambda a, b: gmm(a, b, gs, preferred_element_type=F32, backend="triton", interpret=True,
                                         tiling=(16, 16, 32)))(lhs, rhs)
    assert out.dtype == F32
    assert_close("gmm f32 out", out, reference_gmm(lhs, rhs, gs, preferred_element_type=F32), 1e-5)


@pytest.mark.parametrize("backend,norm", [("triton", True), ("triton", False), ("mosaic", True)])
def test_route_matches_reference(backend, norm):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    logits[3] = 0.25  # all experts tie: lowest indices win
    logits[7, 1:5] = 2.0  # a tie inside the top-k
    logits = jnp.asarray(logits)
    got = interpret_jit(lambda x: route(x, TOP_K, norm_topk_prob=norm, backend=backend, interpret=True))(logits)
    want = reference_route(logits, TOP_K, norm_topk_prob=norm)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
    for name, g, w in zip(("expert_ids", "group_sizes", "sort_indices"), got[1:], want[1:]):
        assert g.dtype == jnp.int32, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    np.testing.assert_array_equal(got[1][3], [0, 1, 2])


@pytest.mark.parametrize("backend,norm", [("triton", True), ("triton", False), ("mosaic", True)])
def test_route_gradient_matches_jnp_routing(backend, norm):
    """d/d logits of a loss on the weights: the kernel's custom VJP equals autodiff through the jnp routing."""
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.standard_normal((T, E)), F32)
    dw = jnp.asarray(rng.standard_normal((T, TOP_K)), F32)

    def value_and_grad(fn):
        loss = lambda x: jnp.sum(fn(x)[0] * dw)
        return interpret_jit(jax.value_and_grad(loss))(logits)

    got = value_and_grad(lambda x: route(x, TOP_K, norm_topk_prob=norm, backend=backend, interpret=True))
    want = value_and_grad(lambda x: reference_route(x, TOP_K, norm_topk_prob=norm))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert_close("dlogits", got[1], want[1], 1e-6)
    assert float(jnp.abs(want[1]).max()) > 1e-3  # a real gradient, not zeros on both sides


def test_route_odd_sizes_and_multiple_blocks():
    """E and k not powers of two (padded experts and slots), T spanning several token blocks."""
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((50, 6)), BF16)
    got = interpret_jit(lambda x: route(x, 3, norm_topk_prob=True, backend="triton", interpret=True,
                                        block_tokens=16))(logits)
    want = reference_route(logits, 3, norm_topk_prob=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(g, w)


def test_routing_then_gmm_equals_argsort_then_ragged_dot():
    """The MoE dispatch: sort token copies by expert with the kernel's order, then one grouped matmul."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.standard_normal((T, E)), F32)
    x = jnp.asarray(rng.standard_normal((T, K)), F32)
    lhs, rhs, dout = _operands(F32, seed=5)
    w, ids, gs, order = interpret_jit(lambda x: route(x, TOP_K, norm_topk_prob=True, backend="triton",
                                                      interpret=True))(logits)
    got = _kernels("triton")(x[order // TOP_K], rhs, gs, dout)[0]
    rw, rids, rgs, rorder = reference_route(logits, TOP_K, norm_topk_prob=True)
    want = jax.lax.ragged_dot(x[rorder // TOP_K], rhs, rgs, precision=jax.lax.Precision.HIGHEST)
    assert_close("dispatched gmm", got, want, 1e-5)
    # combine: weighted sum of each token's k expert outputs, back in token order
    combine = lambda y, order, w: jnp.zeros((T * TOP_K, N)).at[order].set(y).reshape(T, TOP_K, N).__mul__(
        w[..., None]).sum(1)
    assert_close("combined", combine(got, order, w), combine(want, rorder, rw), 1e-5)


def test_visit_schedule_covers_every_tile_once_in_order():
    starts, ends = group_bounds(jnp.asarray([5, 0, 20, 3], jnp.int32), 40)
    tail_s, tail_e = jnp.concatenate([starts, ends[-1:]]), jnp.concatenate([ends, jnp.array([40], jnp.int32)])
    vis = jax.jit(visits, static_argnums=(2, 3, 4, 5))(tail_s, tail_e, 8, 5, 5 + 4, False)  # Visits: a pytree
    n = int(vis.count[0])
    pairs = list(zip(np.asarray(vis.group[:n]).tolist(), np.asarray(vis.tile[:n]).tolist()))
    # groups: 0 rows 0-4, 2 rows 5-24, 3 rows 25-27, tail (4) rows 28-39; 8-row tiles
    assert pairs == [(0, 0), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3), (4, 3), (4, 4)]
    assert (np.asarray(vis.tile[n:]) == 4).all() and (np.asarray(vis.group[n:]) == 4).all()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_the_real_target(platform):
    """Given only the target platform (as a CPU host compiling ahead of time for a TPU/GPU mesh), gmm (with its
    backward) and routing (with its VJP) pick that platform's lowering, not interpret mode."""
    lhs = jax.ShapeDtypeStruct((1000, 256), BF16)
    rhs = jax.ShapeDtypeStruct((8, 256, 384), BF16)
    gs = jax.ShapeDtypeStruct((8,), jnp.int32)
    logits = jax.ShapeDtypeStruct((1000, 128), F32)
    kw = dict(platform=platform)  # the lowering and interpret=False follow the platform, as for an AOT compile
    grads = jax.value_and_grad(lambda a, b, g: jnp.sum(gmm(a, b, g, **kw).astype(F32)), argnums=(0, 1))
    text = jax.jit(grads).trace(lhs, rhs, gs).lower(lowering_platforms=(platform,)).as_text()
    marker = "tpu_custom_call" if platform == "tpu" else "triton"
    assert text.count(marker) >= 3  # gmm, transposed gmm, tgmm
    route_loss = lambda x: jnp.sum(route(x, 8, norm_topk_prob=True, **kw)[0])
    text = jax.jit(jax.value_and_grad(route_loss)).trace(logits).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text


def test_tiling_rules_and_bad_inputs():
    assert choose_tiling("mosaic", 100_000, 2048, 768, None) == Tiling(256, 512, 256)
    assert choose_tiling("triton", 20, 40, 48, None) == Tiling(32, 64, 64)
    with pytest.raises(ValueError, match="% 128 == 0"):
        choose_tiling("mosaic", 64, 128, 128, (64, 64, 128))
    with pytest.raises(ValueError, match="powers of two"):
        choose_tiling("triton", 64, 128, 128, (48, 16, 16))
    lhs, rhs = jnp.zeros((8, 4)), jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="contracting"):
        gmm(lhs, jnp.zeros((2, 5, 3)), jnp.asarray([4, 4]))
    with pytest.raises(ValueError, match="num_groups"):
        gmm(lhs, rhs, jnp.asarray([4, 2, 2]))
    with pytest.raises(TypeError, match="integers"):
        gmm(lhs, rhs, jnp.asarray([4.0, 4.0]))
    with pytest.raises(TypeError, match="supported"):
        gmm(lhs.astype(jnp.int32), rhs, jnp.asarray([4, 4]))
    with pytest.raises(ValueError, match="k=9"):
        route(jnp.zeros((4, 8)), 9, norm_topk_prob=True)
