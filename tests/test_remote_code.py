"""`convert orbax-to-hf --remote-code-from`: the export loads with transformers' `trust_remote_code=True`.

The test writes its own remote code for the tiny fixture (no network, no upstream code): a configuration module and
a modeling module whose torch parameters are named and shaped like the fixture's upstream keys, referenced by a
config.json `auto_map`, as a released model directory does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from converters.convert import OrbaxSource, hf_to_orbax
from converters.hf_checkpoint import SafetensorsCheckpoint
from sail_jax.cli import main
from tests.conftest import DATA

CKPT = DATA / "sailvl2-tiny" / "checkpoint"
AUTO_MAP = {"AutoConfig": "configuration_tinysail.TinySailConfig", "AutoModel": "modeling_tinysail.TinySailModel"}


def write_remote_code(directory, shapes: dict[str, list[int]]) -> None:
    directory.mkdir()
    (directory / "configuration_tinysail.py").write_text(textwrap.dedent("""
        from transformers import PretrainedConfig


        class TinySailConfig(PretrainedConfig):
            model_type = "sailvl"

            def __init__(self, **kwargs):
                super().__init__(**kwargs)
    """))
    (directory / "modeling_tinysail.py").write_text(textwrap.dedent(f"""
        import torch
        from transformers import PreTrainedModel

        from .configuration_tinysail import TinySailConfig

        SHAPES = {json.dumps(shapes)}


        class TinySailModel(PreTrainedModel):
            config_class = TinySailConfig
            base_model_prefix = ""

            def __init__(self, config):
                super().__init__(config)
                for key, shape in SHAPES.items():
                    *path, leaf = key.split(".")
                    module = self
                    for name in path:
                        if name not in module._modules:
                            module.add_module(name, torch.nn.Module())
                        module = module._modules[name]
                    module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
                self.post_init()

            def _init_weights(self, module):
                pass
    """))
    config = json.loads((CKPT / "config.json").read_text())
    del config["vision_config"]["auto_map"]  # this code has no separate ViT classes
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}))
    processor = json.loads((CKPT / "preprocessor_config.json").read_text())
    processor.pop("auto_map", None)  # nor an image processor class
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))


LOAD = """
import json, sys
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
key = sys.argv[2]
print(json.dumps({"class": type(model).__name__, "value": model.state_dict()[key].tolist()}))
"""


def test_export_with_remote_code_loads_in_transformers(tmp_path):
    with SafetensorsCheckpoint(CKPT) as ckpt:
        shapes = {k: list(ckpt.shape(k)) for k in ckpt.keys()}
    original = tmp_path / "original"
    write_remote_code(original, shapes)
    ours, out = tmp_path / "ours", tmp_path / "hf"
    hf_to_orbax(CKPT, ours, progress=False)
    assert main(["convert", "orbax-to-hf", "--src", str(ours), "--dst", str(out), "--no-progress",
                 "--remote-code-from", str(original)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"configuration_tinysail.py", "modeling_tinysail.py", "preprocessor_config.json"} <= names
    assert (out / "preprocessor_config.json").read_text() == (original / "preprocessor_config.json").read_text()
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names  # from the checkpoint's tokenizer/
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP

    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", LOAD, str(out), key], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["class"] == "TinySailModel"
    want = OrbaxSource(ours)[key].astype(np.float32)
    assert np.any(want != 0)
    np.testing.assert_array_equal(np.asarray(got["value"], np.float32), want)


def test_remote_code_dir_must_hold_what_auto_map_names(tmp_path, capsys):
    original = tmp_path / "original"
    write_remote_code(original, {})
    (original / "modeling_tinysail.py").unlink()
    ours = tmp_path / "ours"
    hf_to_orbax(CKPT, ours, progress=False)
    assert main(["convert", "orbax-to-hf", "--src", str(ours), "--dst", str(tmp_path / "hf"), "--no-progress",
                 "--remote-code-from", str(original)]) == 2
    err = capsys.readouterr().err
    assert "auto_map['AutoModel'] names modeling_tinysail.py" in err and "config.json" in err
    assert not (tmp_path / "hf").exists()  # nothing half-written


@pytest.mark.parametrize("missing", ["dir", "code"])
def test_remote_code_from_needs_code(tmp_path, missing, capsys):
    original = tmp_path / "original"
    if missing == "code":
        original.mkdir()
    ours = tmp_path / "ours"
    hf_to_orbax(CKPT, ours, progress=False)
    assert main(["convert", "orbax-to-hf", "--src", str(ours), "--dst", str(tmp_path / "hf"), "--no-progress",
                 "--remote-code-from", str(original)]) == 2
    assert ("no such remote-code directory" if missing == "dir" else "no remote code here (no *.py files)") in \
        capsys.readouterr().err
