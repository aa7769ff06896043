"""lm_head + cross-entropy whose gradients are computed chunk by chunk in the forward pass.

For a chunk of selected hidden rows h [c, D] and the lm_head kernel W [D, V], d(sum w*NLL)/d logits is
w * (softmax(logits) - onehot(target)), so d/dh = that @ W^T and d/dW = h^T @ that. Computing both while the
chunk's logits exist costs 3 matmuls per chunk and keeps only dh [N, D] and dW [D, V] (parameter-sized) as
residuals, where differentiating a chunked, rematerialised cross-entropy costs 4 (the logits are recomputed in
the backward pass). Called without differentiation it is a plain chunked loss. `targets` and `weights` are data:
no gradient flows to them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sail_jax.training.loss import pad_to_chunks


def fused_linear_cross_entropy(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """(sum of w * NLL, sum of w) for logits = hidden [N, D] @ kernel [D, V], accumulated in float32.

    hidden and kernel are multiplied in hidden's dtype (the compute dtype) with float32 accumulation.
    """
    hidden, targets, weights, chunk = pad_to_chunks(hidden, targets, weights, chunk)
    total = _flce(hidden, kernel, targets, weights.astype(jnp.float32), chunk)
    return total, jnp.sum(weights.astype(jnp.float32))


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.dot(h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)


def _nll(logits: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flce(hidden, kernel, targets, weights, chunk):
    def body(total, xs):
        h, t, w = xs
        nll, _ = _nll(_logits(h, kernel), t)
        return total + jnp.sum(nll * w), None

    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk))
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


def _flce_fwd(hidden, kernel, targets, weights, chunk):
    def body(carry, xs):
        total, dw = carry
        h, t, w = xs
        logits = _logits(h, kernel)
        nll, lse = _nll(logits, t)
        onehot = jnp.arange(logits.shape[-1])[None, :] == t[:, None]
        dlogits = (jnp.exp(logits - lse[:, None]) - onehot) * w[:, None]
        dl = dlogits.astype(h.dtype)
        # contractions written as dot_general (no explicit transposes) so XLA picks the layouts
        dh = jax.lax.dot_general(dl, kernel.astype(h.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        dw = dw + jax.lax.dot_general(h, dl, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * w), dw), dh.astype(h.dtype)

    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, xs)
    return total, (dh.reshape(hidden.shape), dw.astype(kernel.dtype))


def _flce_bwd(chunk, res, g):
    dh, dw = res
    return g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw, None, None


_flce.defvjp(_flce_fwd, _flce_bwd)
