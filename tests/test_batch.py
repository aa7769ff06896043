"""The batch contract: checks that name the offending key, host -> global assembly over eight devices, and the
abstract batch for AOT compilation that matches what the assembly builds."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from sail_jax.config import get_preset
from sail_jax.data.batch import KEYS, abstract_batch, batch_shards, check_batch, local_rows, to_global
from sail_jax.sharding import make_mesh
from sail_jax.training.synthetic import synthetic_data

BASE = get_preset("tiny")
CFG = BASE.replace(llm=dataclasses.replace(BASE.llm, vocab_size=512), img_context_token_id=511,
                   vision=dataclasses.replace(BASE.vision, image_size=28))


def local_batch(rows: int = 8, seq: int = 16, tiles: int = 2) -> dict[str, np.ndarray]:
    return next(synthetic_data(cfg=CFG, global_batch_size=rows, seq_len=seq, process_index=0, process_count=1,
                               seed=0, max_tiles=tiles))


def test_global_batch_on_eight_devices_matches_the_abstract_batch():
    assert jax.device_count() == 8
    local = local_batch()
    check_batch(local, 8, 16, CFG)
    mesh = make_mesh(data=2, fsdp=4)
    assert batch_shards(mesh) == 8
    out, spec = to_global(local, mesh, 8), abstract_batch(CFG, 8, 16, 2, mesh)
    assert tuple(out) == tuple(spec) == KEYS
    for key, value in local.items():
        assert out[key].shape == spec[key].shape == value.shape and out[key].dtype == spec[key].dtype
        assert out[key].sharding == spec[key].sharding and out[key].sharding.spec[0] == ("data", "fsdp", "expert")
        assert len(out[key].sharding.device_set) == 8
        assert out[key].addressable_shards[3].data.shape == (1, *value.shape[1:])
        np.testing.assert_array_equal(np.asarray(out[key]), value)
    # extra host-side keys stay behind; integer token arrays of another width are cast to the contract's int32
    wide = {**local, "info": np.zeros(8), "input_ids": local["input_ids"].astype(np.int64)}
    assert to_global(wide, mesh, 8)["input_ids"].dtype == np.int32 and "info" not in to_global(wide, mesh, 8)


def test_checks_name_the_key_shape_and_dtype():
    good = local_batch(rows=2)
    with pytest.raises(ValueError, match=r"lacks \['tile_mask'\]"):
        check_batch({k: v for k, v in good.items() if k != "tile_mask"}, 2, 16, CFG)
    with pytest.raises(ValueError, match=r"batch\['positions'\] has shape \(2, 15\); expected \(2, 16\)"):
        check_batch({**good, "positions": good["positions"][:, 1:]}, 2, 16, CFG)
    with pytest.raises(ValueError, match=r"batch\['pixel_values'\] has shape \(2, 2, 3, 28, 28\); expected "
                                         r"\(2, 2, 3, 56, 56\)"):
        check_batch(good, 2, 16, CFG.replace(vision=dataclasses.replace(CFG.vision, image_size=56)))
    with pytest.raises(ValueError, match=r"expected \(2, max_tiles, 3, 28, 28\)"):
        check_batch({**good, "pixel_values": good["pixel_values"][:, 0]}, 2, 16, CFG)
    with pytest.raises(ValueError, match=r"batch\['loss_mask'\] has dtype float32; expected int32"):
        check_batch({**good, "loss_mask": good["loss_mask"].astype(np.float32)}, 2, 16, CFG)
    with pytest.raises(ValueError, match="global batch size 4 is not divisible by 3 processes"):
        local_rows(4, 3)
