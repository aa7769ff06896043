"""Faults a careless or hostile user meets, in-process: corrupt, truncated and incomplete checkpoints (checksums
and the fallback to the newest readable step), torn metrics lines, a second run on a locked workdir, and a
decompression bomb in an eval TSV."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sail_jax.config import PRESETS
from sail_jax.evaluation.data import decode_images, read_tsv
from sail_jax.training import distributed
from sail_jax.training.checkpointing import CheckpointConfig, Checkpointer, CheckpointUnreadable
from sail_jax.training.metrics import MetricsWriter
from sail_jax.training.synthetic import SyntheticSource
from tests.trainer_utils import REPO

CFG = PRESETS["tiny"]
OPT = {"c": jax.ShapeDtypeStruct((), jnp.float32)}


def _source() -> SyntheticSource:
    return SyntheticSource(global_batch_size=2, seq_len=32, vocab_size=512, img_context_id=511, tokens_per_tile=4,
                           image_size=56, max_tiles=1)


def _params(step: int) -> dict:
    return {"mlp1": {"w": jnp.arange(64, dtype=jnp.float32) + step}}


def _abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params(0))


@pytest.fixture
def three_steps(tmp_path) -> Path:
    """A workdir with checkpoints 1, 2, 3 (params differ per step; the iterator advanced once per step)."""
    it = _source()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=True))
    for step in (1, 2, 3):
        next(it)
        ckpt.save(step, cfg=CFG, params=_params(step), opt_state={"c": jnp.float32(step)},
                  train_state={"step": step}, data_iter=it)
    ckpt.finish()
    return tmp_path


def _restore_latest(workdir: Path) -> tuple[int, dict, list[str]]:
    warnings: list[str] = []
    ckpt = Checkpointer(workdir, CheckpointConfig())
    try:
        step, (params, _, saved, _) = ckpt.restore_latest(warnings.append, cfg=CFG, abstract_params=_abstract(),
                                                          abstract_opt_state=OPT, data_iter=_source())
    finally:
        ckpt.close()
    assert saved["step"] == step
    return step, params, warnings


def _params_file(workdir: Path, step: int) -> Path:
    """The largest data file of the step's params (the compressed array chunks)."""
    files = [p for p in (workdir / "checkpoints" / str(step) / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_every_step_carries_a_manifest_that_verifies(three_steps):
    step, params, warnings = _restore_latest(three_steps)
    assert step == 3 and warnings == []
    np.testing.assert_array_equal(params["mlp1"]["w"], _params(3)["mlp1"]["w"])
    manifest = json.loads((three_steps / "checkpoints" / "3" / "checksums.json").read_text())
    assert any(f.startswith("params/") for f in manifest["files"])
    assert any(f.startswith("data_iter/") for f in manifest["files"])


def test_a_flipped_byte_is_refused_and_resume_falls_back(three_steps):
    f = _params_file(three_steps, 3)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    step, params, warnings = _restore_latest(three_steps)
    rel = f.relative_to(three_steps / "checkpoints" / "3")
    assert step == 2
    np.testing.assert_array_equal(params["mlp1"]["w"], _params(2)["mlp1"]["w"])
    assert warnings[0].startswith(f"checkpoint 3 unreadable: {rel}: checksum mismatch")
    assert "resuming from checkpoint 2" in warnings[1] and "checkpoints-unreadable" in warnings[1]
    assert not (three_steps / "checkpoints" / "3").exists()
    assert [p.name.split("-")[0] for p in (three_steps / "checkpoints-unreadable").iterdir()] == ["3"]


def test_a_truncated_file_names_the_file_and_says_truncated(three_steps):
    f = _params_file(three_steps, 3)
    size = f.stat().st_size
    with f.open("r+b") as fh:
        fh.truncate(size // 2)
    step, _, warnings = _restore_latest(three_steps)
    rel = f.relative_to(three_steps / "checkpoints" / "3")
    assert step == 2
    assert warnings[0].startswith(f"checkpoint 3 unreadable: {rel}: truncated ({size // 2} of {size} bytes)")


def test_a_missing_item_and_a_corrupt_iterator_json_fall_back(three_steps):
    import shutil

    shutil.rmtree(three_steps / "checkpoints" / "3" / "train_state")
    # Step 2 without its manifest (as written before checksums existed): the iterator JSON is caught on decode.
    step2 = three_steps / "checkpoints" / "2"
    (step2 / "checksums.json").unlink()
    (step2 / "data_iter" / "process_0-of-1.json").write_text('{"step": 2, "cons')
    step, params, warnings = _restore_latest(three_steps)
    assert step == 1
    np.testing.assert_array_equal(params["mlp1"]["w"], _params(1)["mlp1"]["w"])
    assert warnings[0].startswith("checkpoint 3 unreadable: train_state/: missing item")
    assert warnings[1].startswith("checkpoint 2 unreadable: ") and "process_0-of-1.json" in warnings[1]
    assert "not valid JSON" in warnings[1] and "\n" not in warnings[1]


def test_no_readable_step_is_one_clear_error(three_steps):
    for step in (1, 2, 3):
        (three_steps / "checkpoints" / str(step) / "model_config" / "metadata").write_text("{}")
    with pytest.raises(ValueError, match="no checkpoint in .* can be restored"):
        _restore_latest(three_steps)
    assert sorted(p.name for p in (three_steps / "checkpoints").iterdir()) == ["1", "2", "3"]  # nothing moved


def test_unreadable_names_step_and_file():
    assert str(CheckpointUnreadable(30, "params/x: truncated")) == "checkpoint 30 unreadable: params/x: truncated"


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    writer = MetricsWriter(tmp_path, total_steps=6, start_step=2, enabled=True)
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(ln + "\n" for ln in lines[:2])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'metrics.jsonl'}: dropped 1 unparsable line" in err


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    other = textwrap.dedent(f"""
        import sys
        from sail_jax.training import distributed
        try:
            with distributed.workdir_lock({str(tmp_path)!r}):
                pass
        except ValueError as e:
            print(e)
            sys.exit(3)
    """)
    with distributed.workdir_lock(tmp_path):
        with distributed.workdir_lock(tmp_path):  # re-entrant within the process (CLI, then train())
            pass
        r = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, cwd=REPO,
                           env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 3, r.stderr
        assert r.stdout.startswith(f"workdir {tmp_path} is in use by another run (pid ")
        assert len(r.stdout.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr  # released when the holder is done


def test_a_decompression_bomb_in_an_eval_tsv_is_a_located_error(tmp_path, monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    tsv = tmp_path / "bench.tsv"
    tsv.write_text(f"index\timage\tquestion\tanswer\n7\t{b64}\twhat?\tA\n")
    item = read_tsv(tsv)[0]
    assert decode_images(item, tsv)[0].size == (100, 100)
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS as decompression bombs; a low limit makes this one a bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"bench.tsv: row 1 \(index 7\): column 'image', image 0: .*decompression"):
        decode_images(item, tsv)


def test_a_prompt_beyond_the_context_is_refused_before_any_compute():
    import flax.linen as nn

    from sail_jax.config import LLMConfig, RuntimeConfig
    from sail_jax.inference.engine import Engine, Request
    from sail_jax.inference.sampling import SamplingParams
    from sail_jax.models.qwen3 import Qwen3ForCausalLM

    cfg = LLMConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, max_position_embeddings=40)
    lm = Qwen3ForCausalLM(cfg, RuntimeConfig())
    params = nn.unbox(jax.eval_shape(lm.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    engine = Engine(lm, params, decode_steps=4)
    prompts = [Request(np.arange(8, dtype=np.int32)), Request(np.arange(33, dtype=np.int32))]
    with pytest.raises(ValueError, match=r"^request 1: prompt of 33 tokens \+ max_new_tokens 8 = 41 positions, more "
                                         r"than the model's max_position_embeddings 40; "):
        engine.generate(prompts, SamplingParams(max_new_tokens=8))


def _record(image: str) -> bytes:
    return json.dumps({"image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                         {"from": "gpt", "value": "a"}]}).encode()


@pytest.mark.parametrize("name, message", [
    ("../outside/x.png", "image path '../outside/x.png' leaves the image root"),
    ("a/../../x.png", "image path 'a/../../x.png' leaves the image root"),
    ("/etc/passwd", "image path '/etc/passwd' is absolute"),
])
def test_training_image_paths_stay_under_their_root(data_dir, tmp_path, name, message):
    from sail_jax.data.sources import RawRecord
    from sail_jax.data.transforms import SampleTransform

    t = SampleTransform(tokenizer_dir=str(data_dir / "tokenizer"), image_root=str(tmp_path / "root"), dataset=0,
                        seq_len=256, max_tiles=2, image_size=56)
    out = t.map(RawRecord(_record(name), "train.jsonl:3"))
    assert out["skip"] == "malformed" and out["where"] == "train.jsonl:3" and message in out["error"]
    # Trusted data may name any file: the option lets the path through to the image loader.
    trusting = SampleTransform(**{**dataclasses.asdict(t), "allow_absolute_image_paths": True})
    out = trusting.map(RawRecord(_record(name), "train.jsonl:3"))
    assert out["skip"] in ("missing_image", "bad_image") and "leaves" not in out["error"]
    assert "absolute" not in out["error"]


def test_batch_request_image_paths_stay_under_the_file(tmp_path, capsys):
    from sail_jax.cli import main

    req = tmp_path / "requests.jsonl"
    req.write_text(json.dumps({"id": 1, "prompt": "hi", "images": ["ok.png"]}) + "\n"
                   + json.dumps({"id": 2, "prompt": "hi", "images": ["../secret.png"]}) + "\n")
    rc = main(["generate", "--checkpoint", str(tmp_path / "none"), "--batch", str(req), "--out",
               str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{req} line 2: image path '../secret.png' leaves the image root {tmp_path}" in err, err
    assert not (tmp_path / "a.jsonl").exists()


def _text_jsonl(path: Path, n: int, bad: np.ndarray | None = None) -> str:
    good = {"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "ok"}]}
    path.write_text("".join(("{broken" if bad is not None and bad[i] else json.dumps(good)) + "\n" for i in range(n)))
    return str(path)


def _data_config(data_dir, datasets, **kw):
    from sail_jax.data.pipeline import DataConfig

    args = dict(datasets=datasets, tokenizer_dir=str(data_dir / "tokenizer"), seq_len=64, batch_size=2,
                max_tiles=2, image_size=56, num_devices=1, num_workers=0, num_packing_bins=2, shuffle=False)
    return DataConfig(**{**args, **kw})


@pytest.mark.parametrize("rate, fails", [(0.04, False), (0.10, True)])
def test_the_bad_record_guard_tolerates_4_percent_and_stops_10(rate, fails):
    """A seeded stream of 3000 records at the default limit (5%, checked from 100 records on)."""
    import grain

    from sail_jax.data.packing import SkipBadSamplesIterDataset

    bad = np.random.default_rng(7).random(3000) < rate

    def element(i: int) -> dict:
        if bad[i]:
            return {"skip": "malformed", "dataset": 0, "where": f"d.jsonl:{i + 1}", "error": "not valid JSON"}
        return {"info": {"dataset": 0}}

    ds = SkipBadSamplesIterDataset(grain.MapDataset.range(3000).map(element).to_iter_dataset(), ["d.jsonl"])
    if fails:
        with pytest.raises(ValueError, match=r"dataset d\.jsonl: \d+ of \d+ samples were unusable"):
            list(ds)
    else:
        assert len(list(ds)) == 3000 - bad.sum()


def test_a_changed_data_config_is_one_line_not_a_fallback(data_dir, tmp_path):
    from sail_jax.data.pipeline import DataConfigMismatch, DatasetSpec, build_dataset

    spec = DatasetSpec(_text_jsonl(tmp_path / "a.jsonl", 40))
    it = iter(build_dataset(_data_config(data_dir, [spec]), 0, 1))
    next(it)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=False))
    ckpt.save(1, cfg=CFG, params=_params(1), opt_state={"c": jnp.float32(1)}, train_state={"step": 1}, data_iter=it)
    ckpt.finish()
    other = iter(build_dataset(_data_config(data_dir, [spec], seq_len=48), 0, 1))
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    warnings: list[str] = []
    try:
        with pytest.raises(DataConfigMismatch, match=r"^checkpoint 1: the data configuration differs from the "
                                                     r"checkpoint's \(seq_len: 64 -> 48\); resume with"):
            ckpt.restore_latest(warnings.append, cfg=CFG, abstract_params=_abstract(), abstract_opt_state=OPT,
                                data_iter=other)
    finally:
        ckpt.close()
    assert warnings == [] and (tmp_path / "checkpoints" / "1").is_dir()
    # The same configuration restores the position exactly.
    same = iter(build_dataset(_data_config(data_dir, [spec]), 0, 1))
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    ckpt.restore_latest(warnings.append, cfg=CFG, abstract_params=_abstract(), abstract_opt_state=OPT, data_iter=same)
    ckpt.close()
    np.testing.assert_array_equal(next(same)["input_ids"], next(it)["input_ids"])
