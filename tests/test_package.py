"""The built wheel works outside any checkout: it ships `configs/` and `assets/`, and the commands and lookups that
use them (gin's `configs/...` paths, the bundled tokenizer, the demo's config) find the installed copies.

The wheel is built from a copy of the sources and installed into a fresh venv in a temporary directory; the venv
reaches the dependencies through a plain path line to this interpreter's site-packages (a path line runs no .pth
file there, so an editable install of this checkout stays invisible). Every command runs from an empty directory
with no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("sail_jax", "converters", "pallas_kernels", "configs", "assets", "pyproject.toml", "setup.py", "README.md")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# Run by the installed interpreter: where each lookup lands.
PROBE = """
import json, sys
import converters, sail_jax
from sail_jax import resources
from sail_jax.evaluation import demo
from sail_jax.data.processor import SailProcessor
from sail_jax.data.tokenizer import find_tokenizer_dir
from sail_jax.training import gin_setup

proc = SailProcessor.from_dir("assets/tokenizer")
gin_setup.parse(["configs/stage/sft.gin", "configs/model/tiny.gin"], [], required=("MODEL",), finalize=False)
print(json.dumps({
    "modules": [sail_jax.__file__, converters.__file__, gin_setup.__file__],
    "data_root": str(resources.DATA_ROOT), "demo_gin": str(demo.DEMO_GIN), "demo_gin_exists": demo.DEMO_GIN.is_file(),
    "tokenizer_dir": str(find_tokenizer_dir("assets/tokenizer")), "tokens": proc.tokenizer.encode("<|im_start|>user"),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv with the wheel built from this checkout; returns its paths and the environment to run it in."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=True, timeout=300)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
        str(src))
    [wheel] = (tmp / "dist").glob("sail_jax-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "sail_jax_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "SAIL_JAX_MALLOC_TUNED")}
    return {"venv": venv, "site": site, "python": python, "work": work, "env": env}


def run_installed(installed: dict, *argv: str) -> subprocess.CompletedProcess:
    """The installed `sail-jax` console script with `argv`, from an empty directory outside the checkout."""
    return subprocess.run([str(installed["venv"] / "bin" / "sail-jax"), *argv], cwd=installed["work"],
                          env=installed["env"], capture_output=True, text=True, timeout=300)


# (command line, how its output starts): run with the installed console script from an empty directory.
INSTALLED_COMMANDS = [
    (["--version"], f"sail-jax {VERSION}\n"),
    (["demo", "--help"], "usage: sail-jax demo "),
    (["train", "--help"], "usage: sail-jax train "),
    (["train", "--gin_file=configs/stage/sft.gin", "--gin_file=configs/model/tiny.gin", "--gin.DATA=@synthetic_data",
      "--gin.WORKDIR='run'", "--gin.train.steps=3", "--dry-run"], "model.vision: VisionConfig("),
    # a shipped gin file that `include`s others by their `configs/...` names
    (["train", "--gin_file=configs/synthetic_demo.gin", "--gin.WORKDIR='run'", "--dry-run"],
     "model.vision: VisionConfig("),
]


@pytest.mark.parametrize("argv, expected", INSTALLED_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_installed_command(installed, argv, expected):
    out = run_installed(installed, *argv)
    assert out.returncode == 0 and out.stdout.startswith(expected), (argv, out.stdout[:500], out.stderr)


def test_installed_lookups_find_the_shipped_data(installed):
    out = subprocess.run([str(installed["python"]), "-c", PROBE], cwd=installed["work"], env=installed["env"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    site = installed["site"].resolve()
    for module in found["modules"]:
        assert Path(module).resolve().is_relative_to(site), module  # the installed package, not the checkout
    assert Path(found["data_root"]).resolve() == site / "sail_jax"
    assert found["demo_gin_exists"] and Path(found["demo_gin"]).resolve().is_relative_to(site)
    assert Path(found["tokenizer_dir"]).resolve() == site / "sail_jax" / "assets" / "tokenizer"
    assert found["tokens"] == [151644, 872]  # <|im_start|> is an added token of the bundled tokenizer
    assert not (installed["work"] / "configs").exists() and not list(installed["work"].iterdir())
