"""The four conversions, each streaming one tensor at a time through the mapping table.

Every direction sees its source as upstream-named tensors (an upstream safetensors directory, a PyTorch state
dict, or our checkpoint viewed through the mapping table) and checks keys, shapes and dtypes against the plan
before reading any data. Destinations are written into a temporary directory beside them and renamed into place
only when complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from etils import epath

from converters.core import ConversionError, check_source, leaf_dtypes, make_plan
from converters.hf_checkpoint import SafetensorsCheckpoint, local_upstream_dir
from converters.hf_config import (
    from_hf_config,
    generation_config_dict,
    llm_generation_config_dict,
    sailvl_config_dict,
    transformers_llm_config_dict,
)
from converters.hf_writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_safetensors_dir
from converters.mapping import TRANSFORMS, model_entries
from converters.orbax_io import (
    MODEL_CONFIG,
    PARAMS,
    TOKENIZER,
    ParamsReader,
    ParamsWriter,
    checkpoint_tokenizer,
    copy_tokenizer_files,
    has_tokenizer,
    is_our_checkpoint,
    load_model_config,
    save_model_config,
    unflatten,
    write_step_metadata,
)
from sail_jax.config import ModelConfig
from sail_jax.files import apply_umask, as_path, is_url, upload_tree

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_WRITTEN_BY_US = ("config.json", "generation_config.json", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json")


class TensorSource(Protocol):
    """Upstream-named tensors, read one at a time."""

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def __getitem__(self, key: str) -> np.ndarray: ...


class OrbaxSource:
    """Our checkpoint seen as upstream tensors: each key's slice is read and transformed on demand."""

    def __init__(self, directory: str | Path):
        self.cfg = load_model_config(directory)
        self.reader = ParamsReader(directory)
        self.plan = make_plan(model_entries(self.cfg), unflatten(self.reader.arrays))
        self._entries = {e.hf_key: e for e in self.plan.entries}
        self._shapes = self.plan.hf_shapes()

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self.reader.arrays[self._entries[key].path].dtype)

    def __getitem__(self, key: str) -> np.ndarray:
        e = self._entries[key]
        return TRANSFORMS[e.transform].to_hf(self.reader.read(e.path, e.index))


def open_source(src: str | Path) -> tuple[ModelConfig, TensorSource]:
    """(config, tensors) of an upstream SAIL-VL2 directory or of our checkpoint directory, local or on an object
    store (an upstream one is copied to the local cache first)."""
    if is_our_checkpoint(src):
        source = OrbaxSource(src)
        return source.cfg, source
    if is_url(src) and not (as_path(src) / "config.json").is_file():
        raise ConversionError(f"{src}: neither a sail-jax checkpoint (params/ + model_config/) nor has config.json")
    src = local_upstream_dir(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    if not (src / "config.json").exists():
        raise ConversionError(f"{src}: neither a sail-jax checkpoint (params/ + model_config/) nor has config.json")
    return from_hf_config(src), SafetensorsCheckpoint(src)


def looks_like_checkpoint(directory: Path) -> bool:
    """One of our outputs: an upstream/transformers directory (config.json) or our Orbax layout (params/)."""
    return directory.is_dir() and ((directory / "config.json").is_file() or (directory / PARAMS).is_dir())


def remove_leftovers(dst: Path) -> None:
    """Remove `.DST.tmp-*` / `.DST.old-*` directories that a killed conversion to `dst` left beside it (two
    conversions to one destination at once are not supported: the later rename would replace the earlier)."""
    for leftover in sorted([*dst.parent.glob(f".{dst.name}.tmp-*"), *dst.parent.glob(f".{dst.name}.old-*")]):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            print(f"removed {leftover}, left by an interrupted conversion", file=sys.stderr)


@contextlib.contextmanager
def atomic_destination(dst: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `dst`, renamed to `dst` only if the block succeeds (removed otherwise). For an
    object-store URL, see `_staged_upload`."""
    if is_url(dst):
        with _staged_upload(as_path(dst), overwrite) as tmp:
            yield tmp
        return
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.exists() and not looks_like_checkpoint(dst):
        raise ConversionError(f"{dst} does not look like a checkpoint (no config.json or params/), so --overwrite "
                              f"will not replace it; remove it yourself or choose another --dst")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    apply_umask(tmp)  # mkdtemp creates 0700; the destination gets the user's ordinary permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / dst.name)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


COMMIT_MARKER = "commit_success.txt"  # Orbax's sign of a complete item on an object store (no rename there)


@contextlib.contextmanager
def _staged_upload(dst: epath.Path, overwrite: bool) -> Iterator[Path]:
    """A local temporary directory, uploaded to `dst` only if the block succeeds. An object store has no rename:
    the files are uploaded one by one, the files that mark a complete checkpoint (config.json, model_config/,
    _CHECKPOINT_METADATA) last, so a reader never takes an interrupted upload for a checkpoint; an existing
    destination (--overwrite) is deleted just before the upload. Our `params/` gets Orbax's commit marker, which a
    restore from an object store requires (Orbax's own saves write it there; a local directory has none)."""
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.exists() and not looks_like_checkpoint(dst):
        raise ConversionError(f"{dst} does not look like a checkpoint (no config.json or params/), so --overwrite "
                              f"will not replace it; remove it yourself or choose another --dst")
    tmp = Path(tempfile.mkdtemp(prefix="sail-jax-upload-"))
    try:
        yield tmp
        if (tmp / PARAMS).is_dir():  # on an object store Orbax restores an item only beside its commit marker
            (tmp / PARAMS / COMMIT_MARKER).write_text(f"Checkpoint commit was successful to {dst / PARAMS}")
        if dst.exists():
            dst.rmtree()
        upload_tree(tmp, dst, last=("config.json", MODEL_CONFIG, "_CHECKPOINT_METADATA"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                smoothing=0.1)


def _common_dtype(dtypes: Any) -> str:
    """The stored dtype name if all agree, else float32 (the widest we store)."""
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 else "float32"


# ----------------------------------------------------------------------------------------------------------
# -> our checkpoint


def write_ours(
    source: TensorSource,
    cfg: ModelConfig,
    dst: str | Path,
    *,
    scan_layers: bool = False,
    dtype: str | None = None,
    mesh: jax.sharding.AbstractMesh | None = None,
    overwrite: bool = False,
    progress: bool = True,
    abstract: Any = None,
    source_name: str = "source",
    tokenizer: str | Path | None = None,
) -> ModelConfig:
    """Stream `source` (upstream key names) into our checkpoint at `dst`; returns the stored config.

    `tokenizer`: a directory whose tokenizer / processor files the checkpoint carries (its `tokenizer/` item).

    `abstract` (our param tree's shapes, boxed with logical axis names for mesh layouts) defaults to the model's
    abstract init for `cfg` in the chosen layout.
    """
    cfg = cfg.with_runtime(scan_layers=scan_layers)
    if tokenizer is not None and not has_tokenizer(tokenizer):
        raise FileNotFoundError(f"{tokenizer}: no tokenizer here (expected tokenizer.json, or vocab.json + merges.txt)")
    if abstract is None:
        from sail_jax.params import abstract_model_params

        abstract = abstract_model_params(cfg)["params"]
    plan = make_plan(model_entries(cfg, scan_layers), abstract)
    check_source(plan, source.keys(), source.shape, source.dtype, source_name)
    dtypes = leaf_dtypes(plan, source.dtype, source_name) if dtype is None else {p: np.dtype(dtype) for p in
                                                                                  plan.leaves}
    cfg = cfg.with_runtime(param_dtype=_common_dtype(dtypes.values()))
    total = sum(int(np.prod(plan.hf_shape(e))) * source.dtype(e.hf_key).itemsize for e in plan.entries)
    with atomic_destination(dst, overwrite) as tmp:
        writer = ParamsWriter(tmp / "params", plan.leaves, dtypes, mesh)
        with _progress(total, f"{source_name} -> {Path(dst).name}", progress) as bar:
            for e in plan.entries:
                x = source[e.hf_key]
                nbytes = x.nbytes
                y = TRANSFORMS[e.transform].to_ours(x, plan.leaves[e.path].slice_shape)
                del x
                writer.write(e.path, e.index, y)
                del y
                bar.set_postfix_str(e.hf_key, refresh=False)
                bar.update(nbytes)
        writer.finalize()
        save_model_config(tmp, cfg)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp / TOKENIZER)
        write_step_metadata(tmp)
    return cfg


def hf_to_orbax(src: str | Path, dst: str | Path, tokenizer: str | Path | None = None, **kw: Any) -> ModelConfig:
    """Upstream SAIL-VL2 directory (or our checkpoint, for a re-layout) -> our checkpoint, carrying `tokenizer`
    (default: the source's own tokenizer files, if any)."""
    cfg, source = open_source(src)
    return write_ours(source, cfg, dst, source_name=str(src), tokenizer=tokenizer or checkpoint_tokenizer(src), **kw)


def torch_to_orbax(src: str | Path, config: str | Path, dst: str | Path, tokenizer: str | Path | None = None,
                   **kw: Any) -> ModelConfig:
    """PyTorch state dict with upstream keys + an upstream config.json -> our checkpoint, carrying `tokenizer`
    (default: the tokenizer files beside config.json, if any)."""
    from converters.torch_checkpoint import TorchStateDict

    cfg = from_hf_config(config)
    tokenizer = tokenizer or checkpoint_tokenizer(Path(config).parent)
    return write_ours(TorchStateDict(src), cfg, dst, source_name=str(src), tokenizer=tokenizer, **kw)


# ----------------------------------------------------------------------------------------------------------
# -> upstream / transformers directories


def _copy_tokenizer(tokenizer: str | Path, dst: Path, with_remote_code: bool) -> None:
    """Copy tokenizer / processor files (every file but weights and the configs we write ourselves)."""
    src = as_path(tokenizer)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such tokenizer directory")
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in _WRITTEN_BY_US or f.suffix in WEIGHT_SUFFIXES:
            continue
        if not with_remote_code and (f.suffix == ".py" or f.name in ("preprocessor_config.json",
                                                                      "processor_config.json")):
            continue
        if is_url(f):
            (dst / f.name).write_bytes(f.read_bytes())
        else:
            shutil.copy2(f, dst / f.name)


def _write_hf(
    source: TensorSource,
    keys: list[tuple[str, str]],
    dst: Path,
    dtype: str | None,
    max_shard_size: int,
    progress: bool,
    desc: str,
) -> str:
    """Write (source key, output key) pairs as safetensors; returns the dtype name for config.json."""
    specs = [TensorSpec(out, tuple(source.shape(k)), np.dtype(dtype) if dtype else np.dtype(source.dtype(k)))
             for k, out in keys]
    by_out = {out: k for k, out in keys}
    with _progress(sum(s.nbytes for s in specs), desc, progress) as bar:
        def done(spec: TensorSpec) -> None:
            bar.set_postfix_str(spec.key, refresh=False)
            bar.update(spec.nbytes)

        write_safetensors_dir(dst, specs, lambda out: source[by_out[out]], max_shard_size, done)
    return _common_dtype(s.dtype for s in specs)


def _json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def orbax_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: str | Path | None = None,
    remote_code_from: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Our checkpoint (or an upstream directory, to re-shard / re-type it) -> upstream SAIL-VL2 directory.

    Writes every key of the upstream schema, `language_model.lm_head.weight` included, and the tokenizer
    (`tokenizer`, default the checkpoint's own). `remote_code_from`: the original model's directory, whose code and
    processor files (`converters.remote_code`) make the export load with transformers' `trust_remote_code=True`.
    """
    from converters.remote_code import apply_auto_maps, find_remote_code

    remote_code = find_remote_code(remote_code_from) if remote_code_from is not None else None
    cfg, source = open_source(src)
    _check_upstream(cfg, source, str(src))
    keys = [(e.hf_key, e.hf_key) for e in model_entries(cfg, False)]
    with atomic_destination(dst, overwrite) as tmp:
        stored = _write_hf(source, keys, tmp, dtype, max_shard_size, progress, f"{Path(src).name} -> {Path(dst).name}")
        _json(tmp / "generation_config.json", generation_config_dict())
        tokenizer = tokenizer or checkpoint_tokenizer(src)
        if tokenizer is not None:
            _copy_tokenizer(tokenizer, tmp, with_remote_code=True)
        if remote_code is not None:  # after the tokenizer: the original's processor files and template win
            remote_code.copy(tmp)
        config = sailvl_config_dict(cfg, stored)
        _json(tmp / "config.json", apply_auto_maps(config, remote_code.auto_maps) if remote_code else config)


def export_llm(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """The language model alone, as a transformers Qwen3ForCausalLM / Qwen3MoeForCausalLM directory."""
    from converters.mapping import llm_entries

    cfg, source = open_source(src)
    _check_upstream(cfg, source, str(src))
    prefix = "language_model."
    keys = [(e.hf_key, e.hf_key.removeprefix(prefix)) for e in llm_entries(cfg.llm, False, prefix)]
    with atomic_destination(dst, overwrite) as tmp:
        stored = _write_hf(source, keys, tmp, dtype, max_shard_size, progress, f"{Path(src).name} -> {Path(dst).name}")
        _json(tmp / "config.json", transformers_llm_config_dict(cfg.llm, stored))
        _json(tmp / "generation_config.json", llm_generation_config_dict())
        tokenizer = tokenizer or checkpoint_tokenizer(src)
        if tokenizer is not None:
            _copy_tokenizer(tokenizer, tmp, with_remote_code=False)


def _check_upstream(cfg: ModelConfig, source: TensorSource, name: str) -> None:
    """An upstream directory must hold exactly the model's keys and shapes (our checkpoints do by construction)."""
    if isinstance(source, OrbaxSource):
        return
    from sail_jax.params import abstract_model_params

    plan = make_plan(model_entries(cfg, False), abstract_model_params(cfg.with_runtime(scan_layers=False))["params"])
    check_source(plan, source.keys(), source.shape, source.dtype, name)
