"""Train-step pieces: optimizer masks and schedule, state shardings, the global token-mean loss with its static
budget, the fused lm_head cross-entropy, the synthetic source, iterator checkpoints (Grain and plain) and the
FLOPs formula."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sail_jax.config import PRESETS
from sail_jax.models.sail_vl import SailVL
from sail_jax.params import abstract_model_params
from sail_jax.sharding import batch_sharding, use_mesh
from sail_jax.training.checkpointing import CheckpointConfig, Checkpointer
from sail_jax.training.fused_ce import fused_linear_cross_entropy
from sail_jax.training.loss import pad_to_chunks
from sail_jax.training.metrics import part_multipliers, step_flops
from sail_jax.training.optim import OptimizerConfig, decay_mask, group_labels, make_optimizer, make_schedule
from sail_jax.training.program import build_program
from sail_jax.training.step import make_loss_fn
from sail_jax.training.synthetic import SyntheticSource, synthetic_data

BASE = PRESETS["tiny"]
CFG = BASE.replace(llm=dataclasses.replace(BASE.llm, vocab_size=512, num_layers=1),
                   vision=dataclasses.replace(BASE.vision, image_size=56, num_layers=1), img_context_token_id=511)


def leaves_by_name(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_only_on_matrices(scan):
    params = nn.unbox(abstract_model_params(CFG.with_runtime(scan_layers=scan))["params"])
    mask = leaves_by_name(decay_mask(params))
    shapes = {k: v.shape for k, v in leaves_by_name(params).items()}
    for name, decay in mask.items():
        is_matrix = not name.endswith(("['scale']", "['bias']")) and len(shapes[name]) >= 2
        assert decay == is_matrix, name
    if scan:  # stacked norm scales are 2-D and still excluded
        assert any(len(shapes[k]) == 2 and not mask[k] for k in mask if k.endswith("['scale']"))
    labels = leaves_by_name(group_labels(params, ("adapter",)))
    assert {v for k, v in labels.items() if "['mlp1']" in k} == {"train"}
    assert {v for k, v in labels.items() if "['mlp1']" not in k} == {"frozen"}


def test_schedule_warms_up_then_decays_by_cosine():
    sched = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_fraction=0.03), total_steps=100)
    lrs = np.array([float(sched(s)) for s in range(100)])
    np.testing.assert_allclose(lrs[:3], [1 / 3, 2 / 3, 1.0], rtol=1e-6)
    assert np.all(np.diff(lrs[2:]) < 0) and 0 < lrs[-1] < 1e-3
    np.testing.assert_allclose(lrs[51], 0.5 * (1 + np.cos(np.pi * 49 / 98)), rtol=1e-5)


def test_lr_scales_multiply_a_groups_update():
    params = {"vision_model": {"w": jnp.ones((2, 2))}, "mlp1": {"w": jnp.ones((2, 2))},
              "language_model": {"w": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    base = OptimizerConfig(weight_decay=0.0)
    scaled = OptimizerConfig(weight_decay=0.0, lr_scales=[("adapter", 0.1), ("vision", 0.5)])  # a list, as gin gives
    assert scaled.lr_scales == (("adapter", 0.1), ("vision", 0.5)) and hash(scaled)
    trainable = ("vision", "adapter", "llm")
    u0, _ = make_optimizer(base, params, trainable).update(grads, make_optimizer(base, params, trainable).init(params),
                                                            params)
    tx = make_optimizer(scaled, params, trainable)
    u1, _ = tx.update(grads, tx.init(params), params)
    for key, factor in (("vision_model", 0.5), ("mlp1", 0.1), ("language_model", 1.0)):
        np.testing.assert_allclose(u1[key]["w"], factor * u0[key]["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="lr_scales.*'ViT'"):
        OptimizerConfig(lr_scales=(("ViT", 0.1),))


def test_optimizer_state_is_sharded_like_the_parameters():
    program = build_program(model=CFG, batch_size=4, seq_len=32, steps=1, trainable=("adapter", "llm"),
                            mesh={"data": 2, "fsdp": 2, "tensor": 2})
    params = leaves_by_name(program.shardings.params)
    opt = leaves_by_name(program.shardings.opt_state)
    head = "['language_model']['lm_head']['kernel']"
    assert params[head].spec == P("fsdp", "tensor")
    moments = [k for k in opt if k.endswith(head)]
    assert len(moments) == 2 and all(opt[k] == params[head] for k in moments)  # Adam mu and nu
    assert not any("vision_model" in k for k in opt)  # frozen: no optimizer state at all
    assert all(v.spec == P() for k, v in opt.items() if k.endswith(".count"))


def text_batch(rows: int = 4, seq: int = 32) -> dict[str, np.ndarray]:
    cfg = CFG
    batch = next(synthetic_data(cfg=cfg, global_batch_size=rows, seq_len=seq, process_index=0, process_count=1,
                                seed=3, max_tiles=0))
    assert batch["pixel_values"].shape[1] == 0 and batch["loss_mask"].sum() > 0
    return batch


@jax.jit
def full_logits(params, batch):
    return SailVL(CFG).apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"]).logits


def reference_loss(params, batch, budget: int | None = None, group_rows: int = 1) -> float:
    """Full-vocabulary logits for every position, then the mean NLL over the targets, keeping only the first
    `budget` x `group_rows` of each group of `group_rows` consecutive rows."""
    logits = full_logits(params, {k: batch[k] for k in ("input_ids", "positions", "segment_ids")})
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    total = count = 0.0
    for r in range(batch["input_ids"].shape[0]):
        if r % group_rows == 0:
            seen = 0
        for t in range(batch["input_ids"].shape[1] - 1):
            if batch["loss_mask"][r, t + 1] and batch["segment_ids"][r, t + 1] == batch["segment_ids"][r, t] != 0:
                if budget is None or seen < budget * group_rows:
                    total -= logp[r, t, batch["input_ids"][r, t + 1]]
                    count += 1
                seen += 1
    return total / count


def test_loss_is_the_token_mean_over_the_global_batch_and_respects_the_budget():
    # the trainer's cached sharded initialisation (the same key as tests/test_trainer.py, compiled once)
    program = build_program(model=CFG, batch_size=4, seq_len=32, steps=1, trainable=("adapter", "llm"),
                            optimizer=OptimizerConfig(learning_rate=3e-3), mesh={"data": 2, "fsdp": 2})
    mesh = program.mesh
    with use_mesh(mesh):
        sharded_params = program.init_params(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), sharded_params)
    batch = text_batch()
    loss, m = jax.jit(make_loss_fn(CFG, targets_per_row=32))(params, batch)
    assert float(loss) == pytest.approx(reference_loss(params, batch), rel=1e-5)
    assert m["dropped_targets"] == 0 and m["targets"] == np.sum(batch["loss_mask"][:, 1:] != 0)
    # rows sharded over 4 devices: the same global mean (not a mean of per-shard means)
    with use_mesh(mesh):
        sharded = {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in batch.items()}
        loss_sharded, _ = jax.jit(make_loss_fn(CFG, targets_per_row=32))(sharded_params, sharded)
    assert float(loss_sharded) == pytest.approx(float(loss), rel=1e-6)
    # a static budget of 3 target positions per row: the rest is left out and counted
    loss3, m3 = jax.jit(make_loss_fn(CFG, targets_per_row=3))(params, batch)
    assert float(loss3) == pytest.approx(reference_loss(params, batch, budget=3), rel=1e-5)
    assert m3["targets"] == 12 and m3["dropped_targets"] == m["targets"] - 12
    # a budget pooled over pairs of rows (one pair per shard): a short row lends its spare slots to its partner
    per_row = (batch["loss_mask"][:, 1:] != 0).sum(1)
    b = int(per_row.min()) + 1
    pooled = sum(min(int(per_row[i] + per_row[i + 1]), 2 * b) for i in range(0, len(per_row), 2))
    assert pooled > sum(min(int(n), b) for n in per_row)
    loss_p, m_p = jax.jit(make_loss_fn(CFG, targets_per_row=b, budget_groups=2))(params, batch)
    assert m_p["targets"] == pooled and m_p["dropped_targets"] == m["targets"] - pooled
    assert float(loss_p) == pytest.approx(reference_loss(params, batch, budget=b, group_rows=2), rel=1e-5)
    with use_mesh(mesh):
        loss_ps, _ = jax.jit(make_loss_fn(CFG, targets_per_row=b, budget_groups=2))(sharded_params, sharded)
    assert float(loss_ps) == pytest.approx(float(loss_p), rel=1e-6)


def chunked_cross_entropy(  # the autodiff reference for the fused loss
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """Sum of weighted NLL and sum of weights over rows of `hidden` [N,D] (already selected).

    `logits_fn` maps [c, D] -> [c, V]. Each chunk's logits are recomputed in the backward pass.
    """
    d = hidden.shape[1]
    hidden, targets, weights, chunk = pad_to_chunks(hidden, targets, weights, chunk)
    m = hidden.shape[0] // chunk

    @jax.checkpoint
    def nll(h, t):
        logits = logits_fn(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]

    def body(total, xs):
        h, t, w = xs
        return total + jnp.sum(nll(h, t) * w), None

    xs = (hidden.reshape(m, chunk, d), targets.reshape(m, chunk), weights.reshape(m, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights)


@pytest.mark.parametrize("chunk", [8, 64])
def test_fused_cross_entropy_matches_autodiff_of_the_chunked_loss(chunk):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((37, 16)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((50, 16)) * 0.3, jnp.float32)  # a tied embedding: kernel = emb.T
    t, w = jnp.asarray(rng.integers(0, 50, 37)), jnp.asarray(rng.integers(0, 2, 37), jnp.float32)

    def fused(h, emb):
        total, count = fused_linear_cross_entropy(h, emb.T, t, w, chunk=chunk)
        return total / count

    def chunked(h, emb):
        total, count = chunked_cross_entropy(h, t, w, lambda x: x @ emb.T, chunk=chunk)
        return total / count

    (va, ga), (vb, gb) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, emb) for f in (fused, chunked))
    assert float(va) == pytest.approx(float(vb), rel=1e-6)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert float(jax.jit(fused)(h, emb)) == pytest.approx(float(vb), rel=1e-6)  # the forward-only path


def test_synthetic_batches_are_deterministic_sliceable_and_consistent():
    kw = dict(global_batch_size=4, seq_len=64, vocab_size=512, img_context_id=511, tokens_per_tile=4,
              image_size=56, max_tiles=3, seed=7)
    whole = SyntheticSource(**kw).batch_at(5)
    halves = [SyntheticSource(**kw, process_index=i, process_count=2).batch_at(5) for i in range(2)]
    for k, v in whole.items():
        np.testing.assert_array_equal(v, np.concatenate([h[k] for h in halves]))
    ids, seg, mask = whole["input_ids"], whole["segment_ids"], whole["loss_mask"]
    assert np.all((ids == 511).sum(1) == whole["tile_mask"].sum(1) * 4) and whole["tile_mask"][:, 0].all()
    assert not np.any(mask[ids == 511]) and not np.any(mask[seg == 0])
    starts = np.diff(seg, axis=1, prepend=0) != 0
    assert np.all(whole["positions"][starts & (seg != 0)] == 0)
    src = SyntheticSource(**kw)
    next(src), next(src)
    state = src.get_state()
    again = SyntheticSource(**kw)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["input_ids"], next(src)["input_ids"])
    with pytest.raises(ValueError, match="seed 7"):
        SyntheticSource(**{**kw, "seed": 8}).set_state(state)


@pytest.mark.parametrize("kind", ["grain", "plain"])
def test_iterator_position_is_checkpointed(kind, tmp_path):
    source = SyntheticSource(global_batch_size=2, seq_len=32, vocab_size=512, img_context_id=511,
                             tokens_per_tile=4, image_size=56, max_tiles=1)

    def make():
        if kind == "grain":
            return iter(grain.MapDataset.range(1000).map(source.batch_at).to_iter_dataset())
        return SyntheticSource(global_batch_size=2, seq_len=32, vocab_size=512, img_context_id=511,
                               tokens_per_tile=4, image_size=56, max_tiles=1)

    it = make()
    for _ in range(3):
        next(it)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=False))
    params = {"vision_model": {}, "mlp1": {"w": jnp.ones(2)}, "language_model": {}}
    ckpt.save(3, cfg=CFG, params=params, opt_state={"c": jnp.zeros(())}, train_state={"step": 3},
              data_iter=it, force=True)
    ckpt.close()
    expected = next(it)["input_ids"]
    restored = make()
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    ckpt.restore(3, cfg=CFG, abstract_params=abstract, abstract_opt_state={"c": jax.ShapeDtypeStruct((), jnp.float32)},
                 data_iter=restored)
    ckpt.close()
    np.testing.assert_array_equal(next(restored)["input_ids"], expected)
    assert isinstance(it, grain.DatasetIterator) == (kind == "grain")


def test_flops_formula_and_stage_multipliers():
    assert part_multipliers(("adapter",)) == {"vision": 1, "adapter": 3, "llm": 2}
    assert part_multipliers(("llm",)) == {"vision": 1, "adapter": 1, "llm": 3}
    assert part_multipliers(("vision", "adapter", "llm")) == {"vision": 3, "adapter": 3, "llm": 3}
    llm = CFG.llm
    per_token = 2 * (llm.hidden_size * (4 + 2 * 2) * 16 + 4 * 16 * llm.hidden_size + 3 * 32 * 128)
    attention = 2 * 2 * 4 * 16 * 48 / 2
    got = step_flops(CFG, tokens=100, targets=0, tiles=0, seq_len=48, trainable=("llm",))
    assert got == pytest.approx(3 * 100 * (per_token + attention))
    head = step_flops(CFG, tokens=0, targets=10, tiles=0, seq_len=48, trainable=("llm",))
    assert head == pytest.approx(3 * 10 * 2 * 32 * 512)
    assert step_flops(CFG, tokens=0, targets=0, tiles=2, seq_len=48, trainable=("llm",)) > 0
