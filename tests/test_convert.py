"""Converters on the upstream fixture (tests/data/sailvl2-tiny, made by the original code): HF -> Orbax -> HF is
byte-identical in both layouts, plain Orbax restores what we stream, the converted checkpoint reproduces the
fixture logits through `sail-jax forward`, every failure is reported by key and leaves nothing behind, and the
`model_config/` item round-trips every preset."""

from __future__ import annotations

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from converters.convert import hf_to_orbax, orbax_to_hf
from converters.core import ConversionError
from converters.load import load_sailvl_checkpoint
from converters.model_config import model_config_from_dict, model_config_to_dict
from converters.orbax_io import ParamsWriter, load_model_config, stored_arrays
from sail_jax.cli import main
from sail_jax.config import PRESETS, ConfigError, RuntimeConfig, get_preset
from sail_jax.params import abstract_model_params
from sail_jax.sharding import make_mesh, tree_shardings
from tests.conftest import DATA
from tests.convert_helpers import assert_same_tensors, read_safetensors_dir

FIX = DATA / "sailvl2-tiny"
CKPT = FIX / "checkpoint"


@pytest.fixture(scope="module")
def fixture_tensors():
    tensors, metadata = read_safetensors_dir(CKPT)
    assert metadata == [{"format": "pt"}]
    return tensors


@pytest.fixture(scope="module")
def unscanned(tmp_path_factory):
    d = tmp_path_factory.mktemp("ours") / "unscanned"
    assert main(["convert", "hf-to-orbax", "--src", str(CKPT), "--dst", str(d), "--no-progress"]) == 0
    return d


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, unscanned):
    """Re-laid out from our unscanned checkpoint: both layouts, and our own layout as a source."""
    d = tmp_path_factory.mktemp("ours") / "scanned"
    hf_to_orbax(unscanned, d, scan_layers=True, progress=False)
    return d


def _restore_plain(d, mesh):
    """Plain Orbax restore onto a target of the model's abstract shapes, sharded by the logical-axis rules."""
    cfg = load_model_config(d)
    assert cfg.runtime.param_dtype == "bfloat16"
    boxed = abstract_model_params(cfg)["params"]
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                          tree_shardings(boxed, mesh))
    return cfg, ocp.StandardCheckpointer().restore(d / "params", target)


@pytest.mark.parametrize("layout", ["unscanned", "scanned"])
def test_round_trip_is_byte_identical(layout, request, tmp_path, fixture_tensors):
    d = request.getfixturevalue(layout)
    out = tmp_path / "hf"
    assert main(["convert", "orbax-to-hf", "--src", str(d), "--dst", str(out), "--no-progress",
                 "--tokenizer", str(CKPT)]) == 0
    tensors, metadata = read_safetensors_dir(out)
    assert metadata == [{"format": "pt"}]
    assert_same_tensors(tensors, fixture_tensors)
    ours, upstream = json.loads((out / "config.json").read_text()), json.loads((CKPT / "config.json").read_text())
    assert ours["llm_config"].pop("tie_word_embeddings") is False  # lm_head is stored and loads untied
    upstream["llm_config"].pop("tie_word_embeddings")
    assert ours == upstream
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (CKPT / "generation_config.json").read_text()
    )
    # --tokenizer copied every tokenizer / processor file of the upstream folder, and nothing else
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in CKPT.iterdir())
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja",
                 "preprocessor_config.json"):
        assert (out / name).read_bytes() == (CKPT / name).read_bytes()


@pytest.mark.parametrize("layout", ["unscanned", "scanned"])
def test_plain_orbax_restores_streamed_params(layout, request):
    d = request.getfixturevalue(layout)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    cfg, restored = _restore_plain(d, mesh)
    _, ref = load_sailvl_checkpoint(CKPT, cfg.runtime)  # the in-memory importer, a separate code path
    flat_ref = jax.tree_util.tree_flatten_with_path(ref["params"])[0]
    flat_got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
    assert len(flat_got) == len(flat_ref)
    for kp, want in flat_ref:
        got = flat_got[kp]
        assert got.dtype == want.dtype and got.shape == want.shape, kp
        np.testing.assert_array_equal(np.asarray(got), want)
    embed = restored["language_model"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # the target's shards
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(d / "model_config")
    assert config == model_config_to_dict(cfg)
    step_meta = json.loads((d / "_CHECKPOINT_METADATA").read_text())
    assert set(step_meta["item_handlers"]) == {"params", "model_config", "tokenizer"}


def test_forward_reproduces_fixture_logits(scanned, tmp_path):
    """The prompt up to the end of the first tile's <IMG_CONTEXT> run: the model is causal and tiles are encoded
    independently, so these logits equal the fixture's full-prompt ones (and cost a seventh of the compute)."""
    inputs = np.load(FIX / "inputs.npz")
    ids = inputs["input_ids"]
    ctx = np.flatnonzero(ids[0] == int(inputs["img_context_token_id"]))
    n = int(ctx[255]) + 1
    np.savez(tmp_path / "in.npz", input_ids=ids[:, :n], pixel_values=inputs["pixel_values"][:1])
    out = tmp_path / "out.npz"
    rc = main(["forward", "--checkpoint", str(scanned), "--inputs", str(tmp_path / "in.npz"), "--out", str(out)])
    assert rc == 0
    got, ref = np.load(out), np.load(FIX / "outputs.npz")
    for name in ("logits_logsumexp", "logits_top5_values"):
        assert np.abs(got[name] - ref[name][:, :n]).max() <= 1e-4, name
    decisive = ref["logits_top1_minus_top2"][:, :n] > 1e-3
    np.testing.assert_array_equal(got["logits_argmax"][decisive], ref["logits_argmax"][:, :n][decisive])


def test_mesh_layout_chunks_follow_shards(tmp_path, fixture_tensors):
    d = tmp_path / "meshed"
    assert main(["convert", "hf-to-orbax", "--src", str(CKPT), "--dst", str(d), "--scan-layers", "--no-progress",
                 "--mesh", "fsdp=4,tensor=2"]) == 0
    meta = ocp.StandardCheckpointHandler().metadata(d / "params").tree
    q = meta["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H, hd], (layers, embed, heads)
    assert q.shape == (2, 32, 4, 16)
    assert q.storage.write_shape == (2, 8, 2, 16)  # embed / fsdp 4, heads / tensor 2
    assert q.storage.chunk_shape == (1, 8, 2, 16)  # one layer per chunk: slices are written whole
    restored = ocp.StandardCheckpointer().restore(d / "params")  # no target: the stored mesh layout
    spec = restored["language_model"]["embed_tokens"]["embedding"].sharding.spec
    assert spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    out = tmp_path / "hf"
    orbax_to_hf(d, out, progress=False)
    assert_same_tensors(read_safetensors_dir(out)[0], fixture_tensors)


def test_sharded_input_and_output(tmp_path, unscanned, fixture_tensors):
    src = tmp_path / "sharded"
    src.mkdir()
    keys = sorted(fixture_tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: fixture_tensors[k] for k in ks}, str(src / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in fixture_tensors.values())},
             "weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(CKPT / "config.json", src / "config.json")
    d = tmp_path / "ours"
    hf_to_orbax(src, d, progress=False)
    want = ocp.StandardCheckpointer().restore(unscanned / "params")
    got = ocp.StandardCheckpointer().restore(d / "params")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)

    out = tmp_path / "hf"
    max_shard = 5 * 10**6  # the two 9.7 MB embedding matrices each get a shard of their own
    orbax_to_hf(d, out, max_shard_size=max_shard, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in fixture_tensors.values())
    tensors, metadata = read_safetensors_dir(out)
    assert metadata == [{"format": "pt"}] * len(files)
    assert_same_tensors(tensors, fixture_tensors)
    for f in files:
        ks = [k for k, v in index["weight_map"].items() if v == f.name]
        assert len(ks) == 1 or sum(fixture_tensors[k].nbytes for k in ks) <= max_shard


def test_float32_storage_round_trip(tmp_path, fixture_tensors):
    d = tmp_path / "f32"
    cfg = hf_to_orbax(CKPT, d, dtype="float32", progress=False)
    assert cfg.runtime.param_dtype == "float32"
    assert {a.dtype for a in stored_arrays(d).values()} == {np.dtype("float32")}
    out = tmp_path / "hf"
    orbax_to_hf(d, out, dtype="bfloat16", progress=False)  # bf16 -> f32 -> bf16 is exact
    assert_same_tensors(read_safetensors_dir(out)[0], fixture_tensors)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_torch_state_dict_input(tmp_path, unscanned):
    import torch

    sd = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in read_safetensors_dir(CKPT)[0].items()}
    torch.save(sd, tmp_path / "model.bin")
    d = tmp_path / "ours"
    assert main(["convert", "torch-to-orbax", "--src", str(tmp_path / "model.bin"), "--config",
                 str(CKPT / "config.json"), "--dst", str(d), "--no-progress"]) == 0
    want = ocp.StandardCheckpointer().restore(unscanned / "params")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ocp.StandardCheckpointer().restore(d / "params"),
                 want)


class Payload:
    """Stands in for any object whose unpickling would run code."""


def test_torch_pickle_with_code_is_refused(tmp_path, capsys):
    import torch

    torch.save({"w": torch.ones(2), "extra": Payload()}, tmp_path / "evil.pt")
    rc = main(["convert", "torch-to-orbax", "--src", str(tmp_path / "evil.pt"), "--config", str(CKPT / "config.json"),
               "--dst", str(tmp_path / "d"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Payload" in err and "weights_only=True" in err
    assert not (tmp_path / "d").exists()


def _modified_copy(tmp_path, fixture_tensors, change):
    src = tmp_path / "src"
    src.mkdir()
    tensors = dict(fixture_tensors)
    change(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(CKPT / "config.json", src / "config.json")
    return src


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("mlp1.1.bias"), "missing keys ['mlp1.1.bias']"),
        (lambda t: t.update({"mlp1.2.weight": t["mlp1.1.bias"]}), "unexpected keys ['mlp1.2.weight']"),
        (lambda t: t.update({"mlp1.1.weight": t["mlp1.1.weight"][:, :255]}),
         "key 'mlp1.1.weight' has shape (32, 255), expected (32, 256)"),
        (lambda t: t.update({"mlp1.1.bias": t["mlp1.1.bias"].astype(np.int32)}), "'mlp1.1.bias' has dtype int32"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_source_errors_name_the_key(tmp_path, capsys, fixture_tensors, change, message):
    src = _modified_copy(tmp_path, fixture_tensors, change)
    rc = main(["convert", "hf-to-orbax", "--src", str(src), "--dst", str(tmp_path / "d"), "--no-progress"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination, no temporary directory


def test_stacked_slices_must_share_a_dtype(tmp_path, fixture_tensors):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    src = _modified_copy(tmp_path, fixture_tensors, lambda t: t.update({key: t[key].astype(np.float32)}))
    with pytest.raises(ConversionError, match=f"{key}' has dtype float32 but .*layers.0.mlp.up_proj.weight' has "
                                              "bfloat16"):
        hf_to_orbax(src, tmp_path / "d", scan_layers=True, progress=False)
    hf_to_orbax(src, tmp_path / "d", scan_layers=True, dtype="float32", progress=False)  # unified on request


def test_existing_destination_needs_overwrite(tmp_path, capsys):
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # an earlier output (--overwrite replaces only what looks like one)
    rc = main(["convert", "hf-to-orbax", "--src", str(CKPT), "--dst", str(dst), "--no-progress"])
    assert rc == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["config.json"]
    assert main(["convert", "hf-to-orbax", "--src", str(CKPT), "--dst", str(dst), "--no-progress",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["_CHECKPOINT_METADATA", "model_config", "params", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real = ParamsWriter.write
    calls = []

    def failing(self, *a):
        calls.append(a[0])
        if len(calls) == 20:
            raise OSError("disk full")
        real(self, *a)

    monkeypatch.setattr(ParamsWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        hf_to_orbax(CKPT, tmp_path / "d", progress=False)
    assert len(calls) == 20 and list(tmp_path.iterdir()) == []


def test_writer_refuses_incomplete_arrays(tmp_path):
    from converters.core import Leaf

    leaf = Leaf(("w",), (3, 4), stacked=1)
    w = ParamsWriter(tmp_path / "params", {("w",): leaf}, {("w",): np.dtype("float32")})
    w.write(("w",), (0,), np.ones(4, np.float32))
    with pytest.raises(ConversionError, match=r"not completely written: \['w'\]"):
        w.finalize()


def test_loaded_checkpoint_matches_stored_layout(unscanned):
    from converters.load import load_checkpoint

    cfg, params = load_checkpoint(unscanned, RuntimeConfig(scan_layers=True, param_dtype="float32"))
    assert not cfg.runtime.scan_layers and cfg.runtime.param_dtype == "float32"
    assert params["params"]["language_model"]["layers_1"]["mlp"]["up_proj"]["kernel"].dtype == np.float32


def test_restore_params_onto_shardings_and_config_check(scanned, unscanned):
    from converters.orbax_io import restore_params

    cfg = load_model_config(scanned)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    got = restore_params(scanned, cfg, shardings=tree_shardings(abstract_model_params(cfg)["params"], mesh))
    q = got["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # [L, D, H, hd]
    want = ocp.StandardCheckpointer().restore(scanned / "params")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)
    with pytest.raises(ConversionError, match=r"do not match the model config \(scan_layers=False\)"):
        restore_params(scanned, load_model_config(unscanned))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_config_dict_round_trip(name):
    cfg = get_preset(name, dtype="bfloat16")
    assert model_config_from_dict(json.loads(json.dumps(model_config_to_dict(cfg)))) == cfg
    with pytest.raises(ConfigError, match=r"llm: unknown keys \['hidden'\]"):
        model_config_from_dict({"llm": {"hidden": 3}})
