"""Sharded forward on 8 fake CPU devices equals the single-device forward; params really are split."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sail_jax.config import LLMConfig, RuntimeConfig
from sail_jax.models.qwen3 import Qwen3ForCausalLM
from sail_jax.sharding import (
    LOGICAL_AXIS_RULES,
    abstract_params,
    batch_sharding,
    logical_to_sharding,
    make_mesh,
    tree_shardings,
    use_mesh,
)

CFG = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16)


def test_mesh_axes_and_auto_fill():
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(data=4, fsdp=2, tensor=2)


def test_rules_table_is_single_and_complete():
    names = [r[0] for r in LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))
    for needed in ("vocab", "embed", "mlp", "heads", "kv_heads", "exp", "activation_batch", "activation_exp"):
        assert needed in names


def test_indivisible_dimension_is_replicated():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    s = logical_to_sharding(("kv_heads", "embed"), (3, 64), mesh)
    assert s.spec == P(None, "fsdp")


@pytest.mark.parametrize("scan", [False, True])
def test_sharded_forward_equals_single_device(scan):
    rt = RuntimeConfig(scan_layers=scan)
    lm = Qwen3ForCausalLM(CFG, rt)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 24)), jnp.int32)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # initialised straight into the shards, as the trainer does (no full copy on one device)
    shardings = tree_shardings(abstract_params(lm, ids), mesh)
    with use_mesh(mesh):
        params = jax.jit(lambda rng: nn.unbox(lm.init(rng, ids)), out_shardings=shardings)(jax.random.PRNGKey(0))
    p = params["params"]
    emb = p["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (CFG.vocab_size // 2, CFG.hidden_size // 2)
    mlp = p["layers"]["mlp"] if scan else p["layers_0"]["mlp"]
    lead = (None,) if scan else ()
    assert mlp["gate_proj"]["kernel"].sharding.spec == P(*lead, "fsdp", "tensor")
    assert mlp["down_proj"]["kernel"].sharding.spec == P(*lead, "tensor", "fsdp")
    attn = p["layers"]["self_attn"] if scan else p["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].sharding.spec == P(*lead, "fsdp", "tensor", None)
    assert p["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # the single-device reference runs on exactly the same values, gathered to one device
    single = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), params)
    ref = np.asarray(jax.jit(lm.apply)(single, ids).logits)

    with use_mesh(mesh):
        ids_sharded = jax.device_put(ids, batch_sharding(mesh, ids.shape))
        out = jax.jit(lm.apply)(params, ids_sharded).logits
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5
    assert len(out.sharding.device_set) == 8


def test_bf16_params_and_compute_policy():
    rt = RuntimeConfig(dtype="bfloat16", param_dtype="float32")
    lm = Qwen3ForCausalLM(dataclasses.replace(CFG, num_layers=1), rt)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = lm.init(jax.random.PRNGKey(0), ids)
    leaves = jax.tree.leaves(jax.tree.map(lambda x: x, params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(__import__("flax").linen.unbox(params)))
    assert leaves
    assert lm.apply(params, ids).logits.dtype == jnp.bfloat16
