"""The MoE path of the training loss: router load-balancing loss added with its coefficient, routing metrics.
Runs only where the MoE layer (sail_jax.layers.moe, sail_jax.training.moe_loss) is present."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sail_jax.config import PRESETS
from sail_jax.models.sail_vl import SailVL
from sail_jax.training.step import make_loss_fn
from sail_jax.training.synthetic import synthetic_data


def test_router_loss_and_expert_metrics_enter_the_training_loss():
    base = PRESETS["tiny-moe"]
    cfg = base.replace(llm=dataclasses.replace(base.llm, vocab_size=512, num_layers=1), img_context_token_id=511)
    params = nn.unbox(SailVL(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    batch = next(synthetic_data(cfg=cfg, global_batch_size=2, seq_len=32, process_index=0, process_count=1,
                                seed=0, max_tiles=0))
    loss, m = jax.jit(make_loss_fn(cfg, targets_per_row=32))(params, batch)
    k, coef = cfg.llm.moe.num_experts_per_tok, cfg.llm.moe.router_aux_loss_coef
    # near-uniform routing at initialisation: the unweighted Switch/Qwen loss is about k
    assert 0.5 * k * coef < float(m["aux_loss"]) < 2 * k * coef
    assert float(loss) == pytest.approx(float(m["ce_loss"] + m["aux_loss"]), rel=1e-6)
    assert 0 < float(m["expert_entropy"]) <= math.log(cfg.llm.moe.num_experts) + 1e-6
    assert float(m["expert_max_load"]) >= 1.0
