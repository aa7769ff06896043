"""A small real training run of the tiny Qwen3 LLM on generated arithmetic ("37+45=82"), on CPU in ~1 minute.

Used by `sail-jax demo-llm`: it shows the decoder, the chunked cross-entropy and optax working end to end,
and reports the loss and the answer-digit accuracy before and after training.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sail_jax.config import LLMConfig, RuntimeConfig
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from sail_jax.training.loss import chunked_cross_entropy, next_token_targets, select_targets

VOCAB = "#0123456789+=\n"  # '#' = padding
TOK = {c: i for i, c in enumerate(VOCAB)}


def make_batch(rng: np.random.Generator, batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of concatenated equations; the mask marks answer digits and the newline after them."""
    ids = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), np.int32)
    for r in range(batch):
        pos = 0
        while True:
            a, b = rng.integers(0, 100, 2)
            q, ans = f"{a}+{b}=", f"{a + b}\n"
            if pos + len(q) + len(ans) > seq_len:
                break
            for ch in q + ans:
                ids[r, pos] = TOK[ch]
                pos += 1
            mask[r, pos - len(ans) : pos] = 1
    return ids, mask


def run(steps: int = 300, batch: int = 32, seq_len: int = 64, lr: float = 3e-3, seed: int = 0,
        log_every: int = 25) -> dict[str, float]:
    cfg = LLMConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=1e4)
    model = Qwen3ForCausalLM(cfg, RuntimeConfig())
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, seq_len), jnp.int32))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(params)

    def loss_fn(p, ids, mask):
        targets, w = next_token_targets(ids, mask)
        hidden = model.apply(p, ids, return_hidden=True).hidden
        h, t, w, _ = select_targets(hidden, targets, w)
        logits_fn = lambda x: model.apply(p, x, method=Qwen3ForCausalLM.logits)
        total, count = chunked_cross_entropy(h, t, w, logits_fn, chunk=512)
        return total / jnp.maximum(count, 1.0)

    @jax.jit
    def train_step(p, s, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    @jax.jit
    def answer_accuracy(p, ids, mask):
        targets, w = next_token_targets(ids, mask)
        pred = jnp.argmax(model.apply(p, ids).logits, -1)
        return jnp.sum((pred == targets) * w) / jnp.sum(w)

    eval_ids, eval_mask = make_batch(np.random.default_rng(seed + 1), 64, seq_len)
    acc0 = float(answer_accuracy(params, eval_ids, eval_mask))
    first = last = None
    t0 = time.time()
    for step in range(1, steps + 1):
        ids, mask = make_batch(rng, batch, seq_len)
        params, opt_state, loss = train_step(params, opt_state, ids, mask)
        loss = float(loss)
        first = loss if first is None else first
        last = loss
        if step % log_every == 0 or step == 1:
            print(f"step {step:4d}  loss {loss:.4f}  lr {float(sched(step)):.2e}  {time.time() - t0:.1f}s", flush=True)
    acc1 = float(answer_accuracy(params, eval_ids, eval_mask))
    print(f"loss {first:.3f} -> {last:.3f}; answer-digit accuracy on held-out sums {acc0:.1%} -> {acc1:.1%}")
    return {"first_loss": first, "last_loss": last, "acc_before": acc0, "acc_after": acc1}
