"""AdamW with warmup + cosine, gradient clipping, a weight-decay mask and per-stage freezing.

Freezing is an `optax.multi_transform` over the top-level parameter groups: trainable groups get
clip -> Adam -> decoupled weight decay, frozen groups `set_to_zero` (no optimizer state). The global-norm clip
sits inside the trainable branch, so the norm covers exactly the parameters being trained. The learning rate
is applied outside the transformation (`-lr * update`) so AdaLRS can scale it and the schedule reads the
trainer's step counter, which an AdaLRS rollback does not rewind. `lr_scales` multiplies the update of a group
(e.g. a smaller rate for the ViT and adapter than for the LLM): Adam moves every weight by about the learning
rate per step, which, at one shared rate, can swamp small randomly initialised projections such as the adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Stage-level group name -> top-level key of the SailVL parameter tree.
GROUPS: dict[str, str] = {"vision": "vision_model", "adapter": "mlp1", "llm": "language_model"}
NO_DECAY_NAMES = ("bias", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """SAIL-VL2's recipe: AdamW 0.9/0.999, eps 1e-8, weight decay 0.05 on matrices, clip 1.0, 3% warmup."""

    learning_rate: float = 2e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    warmup_fraction: float = 0.03
    final_lr_fraction: float = 0.0  # cosine decays to this fraction of the peak
    lr_scales: tuple[tuple[str, float], ...] = ()  # (group, multiplier) pairs, e.g. (("adapter", 0.1),)

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"OptimizerConfig.learning_rate={self.learning_rate} must be > 0")
        # gin and lists give lists; the config must stay hashable (it keys the compiled-step cache)
        object.__setattr__(self, "lr_scales", tuple((str(g), float(v)) for g, v in dict(self.lr_scales).items()))
        bad = [g for g, v in self.lr_scales if g not in GROUPS or v <= 0]
        if bad:
            raise ValueError(f"OptimizerConfig.lr_scales: {bad}: groups must be among {sorted(GROUPS)} with a "
                             f"multiplier > 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"OptimizerConfig.warmup_fraction={self.warmup_fraction} must be in [0, 1)")


def check_trainable(trainable: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(trainable) - set(GROUPS))
    if unknown or not trainable:
        raise ValueError(f"trainable={list(trainable)}: expected a non-empty subset of {sorted(GROUPS)}")
    return tuple(g for g in GROUPS if g in trainable)


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """lr(step) for 0-based steps: linear warmup over ceil(warmup_fraction * steps) steps (step 0 gets
    lr/warmup, not 0), then cosine towards final_lr_fraction * lr, reached one step after the last."""
    warmup = max(1, math.ceil(cfg.warmup_fraction * total_steps))
    base = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, max(total_steps + 1, warmup + 1), cfg.learning_rate * cfg.final_lr_fraction
    )
    return lambda step: base(step + 1)


def decay_mask(params: Any) -> Any:
    """True for weight matrices; False for norm scales, biases and any 1-D parameter (scanned or not)."""

    def one(path, x):
        name = getattr(path[-1], "key", None) if path else None
        return x.ndim >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(one, params)


def group_labels(params: dict[str, Any], trainable: Sequence[str]) -> dict[str, Any]:
    """'train' / 'frozen' per leaf, decided by the leaf's top-level group."""
    keys = {GROUPS[g] for g in trainable}
    unknown = sorted(set(params) - set(GROUPS.values()))
    if unknown:
        raise ValueError(f"parameter tree has unexpected top-level keys {unknown}; expected {sorted(GROUPS.values())}")
    return {k: jax.tree.map(lambda _, k=k: "train" if k in keys else "frozen", v) for k, v in params.items()}


def make_optimizer(cfg: OptimizerConfig, params: Any, trainable: Sequence[str]) -> optax.GradientTransformation:
    """Unit-learning-rate update direction; multiply by -lr (see module docstring)."""
    scales = {GROUPS[g]: v for g, v in cfg.lr_scales}
    per_group = lambda updates, params=None: {
        k: jax.tree.map(lambda u, s=scales.get(k, 1.0): u * s, v) for k, v in updates.items()}
    train = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.stateless(per_group),
    )
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, group_labels(params, trainable))


def split_groups(params: dict[str, Any], trainable: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable subtrees, frozen subtrees) by top-level key."""
    keys = {GROUPS[g] for g in trainable}
    return ({k: v for k, v in params.items() if k in keys}, {k: v for k, v in params.items() if k not in keys})


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
