"""Our model checkpoint layout and its readers/writers (the converters' output, and the model half of a trainer step).

A checkpoint directory D holds these Orbax items, exactly as a trainer step directory does:
  D/params/        the unboxed param tree, restorable with `ocp.StandardCheckpointer().restore(D / "params", target)`
  D/model_config/  a JSON item with `converters.model_config.model_config_to_dict(cfg)`
  D/tokenizer/     (when known) the tokenizer and processor files, verbatim (`TOKENIZER_FILES`), so every command
                   runs from D alone
plus D/_CHECKPOINT_METADATA naming the items' handlers, as `ocp.CheckpointManager` writes for a step. The
trainer's CheckpointManager writes and checks its `params` / `model_config` / `tokenizer` items through
`model_save_args`, `params_restore_args` and `check_compatible` here, so both kinds of directory stay one format.

Streaming writer. Orbax's `save` serialises a whole in-memory tree, and a scanned layout stacks layers (and
experts) into arrays far larger than any single upstream tensor. `ParamsWriter` therefore writes each array
itself, one upstream tensor at a time, in the format Orbax's own array handlers produce: it asks Orbax's public
`type_handlers.get_json_tspec_write` for the TensorStore spec of every array (zarr in an OCDBT store under
`ocdbt.process_0/`, the chunk layout Orbax would choose), with Orbax's `shard_axes` option cutting stacked axes
into chunks of one slice so each upstream tensor fills whole chunks. Chunks are copied by TensorStore straight
out of the (possibly transposed) source view into a transaction that is committed every 128 MiB, so memory
stays at one upstream tensor plus a bounded batch; afterwards Orbax's `merge_ocdbt_per_process_files` builds
the root OCDBT manifest, and the `_METADATA` tree file (plus `_sharding` and `array_metadatas/` for a mesh layout) is
written in Orbax's on-disk format. Without a mesh the leaves are recorded as host numpy arrays, which restore
onto whatever shardings the caller's target asks for; with a mesh they are jax.Arrays whose chunks follow the
shards of that mesh and whose sharding metadata names it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from converters.core import ConversionError, Leaf, flat_abstract
from converters.model_config import (
    config_differences,
    model_config_from_dict,
    model_config_to_dict,
    refuse_mismatch,
)
from sail_jax.config import ModelConfig
from sail_jax.files import as_path
from sail_jax.resources import TOKENIZER_FILES

PARAMS = "params"
MODEL_CONFIG = "model_config"
TOKENIZER = "tokenizer"
# What a tokenizer / processor directory (the release's, transformers', ours) holds that `tokenizer/` carries.
# Upper bound on one zarr chunk: the writer's working memory is a few chunks (Orbax's default is a whole shard,
# up to 2 GB); reads are unaffected beyond more, smaller requests.
CHUNK_BYTES = 64 * 2**20
# Writes are staged in a TensorStore transaction and committed every COMMIT_BYTES: one OCDBT commit per small
# slice (e.g. per expert) costs ~25 ms and a data file each; staging bounds the memory this batching costs.
COMMIT_BYTES = 128 * 2**20
_TH = ocp.type_handlers


def is_our_checkpoint(directory: str | Path) -> bool:
    d = as_path(directory)
    return (d / PARAMS).is_dir() and (d / MODEL_CONFIG).is_dir()


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """What `--checkpoint PATH` (and `train.init_from`) names, as an absolute path or URL: a training workdir (or
    its `checkpoints/`) stands for its newest finalised step; a checkpoint directory, or anything else, for itself
    (callers report what is missing). Local paths are made absolute here, once: Orbax fails on relative ones."""
    p = as_path(path)
    if not p.is_dir() or is_our_checkpoint(p) or (p / "config.json").exists():
        return os.fspath(p)
    steps_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted((int(c.name) for c in steps_dir.iterdir() if c.name.isdigit()), reverse=True)
    # Finalised: renamed from its temporary name (local), or carrying its commit marker (object stores).
    latest = next((s for s in steps if ocp.step.is_path_finalized(steps_dir / str(s))), None)
    if latest is not None:
        return os.fspath(steps_dir / str(latest))
    if steps_dir != p:
        raise FileNotFoundError(f"{path}: training workdir without a complete checkpoint in {steps_dir}")
    return os.fspath(p)


def _typestr(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def save_model_config(directory: Path, cfg: ModelConfig) -> None:
    """D/model_config as the JSON item a trainer's CheckpointManager writes (`ocp.args.JsonSave`)."""
    item = directory / MODEL_CONFIG
    item.mkdir(parents=True)
    ocp.JsonCheckpointHandler().save(epath.Path(item), args=ocp.args.JsonSave(model_config_to_dict(cfg)))


def read_model_config_dict(directory: str | Path) -> dict:
    """D/model_config as the stored dict (not yet a ModelConfig: a comparison can name fields it does not know)."""
    item = as_path(directory) / MODEL_CONFIG
    if not item.is_dir():
        raise FileNotFoundError(f"{directory}: no {MODEL_CONFIG}/ item (not a sail-jax checkpoint)")
    return ocp.JsonCheckpointHandler().restore(item, args=ocp.args.JsonRestore())


def load_model_config(directory: str | Path) -> ModelConfig:
    return model_config_from_dict(read_model_config_dict(directory))


def has_tokenizer(directory: str | Path) -> bool:
    """Whether `directory` holds a tokenizer we can build (tokenizer.json, or vocab.json + merges.txt)."""
    d = as_path(directory)
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def checkpoint_tokenizer(directory: str | Path) -> epath.Path | None:
    """The tokenizer a checkpoint carries: our D/tokenizer, or an upstream directory's own files; None if none."""
    d = as_path(directory)
    return next((c for c in (d / TOKENIZER, d) if has_tokenizer(c)), None)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the `TOKENIZER_FILES` of `src` into `dst` (created; either may be a URL); returns the names copied."""
    src, dst = as_path(src), as_path(dst)
    if not has_tokenizer(src):
        raise FileNotFoundError(f"{src}: no tokenizer here (expected tokenizer.json, or vocab.json + merges.txt)")
    dst.mkdir(parents=True, exist_ok=True)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in names:
        (dst / n).write_bytes((src / n).read_bytes())  # small files
    return names


class TokenizerHandler(ocp.CheckpointHandler):
    """The `tokenizer` item of a trainer step: the tokenizer files copied in (process 0 writes, restore gives the
    item's path)."""

    def save(self, directory: epath.Path, args: TokenizerSave) -> None:
        if jax.process_index() == 0:
            copy_tokenizer_files(args.source, directory)

    def restore(self, directory: epath.Path, args: TokenizerSave | None = None) -> epath.Path:
        return directory

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(TokenizerHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class TokenizerSave(ocp.args.CheckpointArgs):
    source: str


def model_save_args(cfg: ModelConfig, params: Any, tokenizer: str | Path | None = None
                    ) -> dict[str, ocp.args.CheckpointArgs]:
    """The `params` + `model_config` (+ `tokenizer`, copied from that directory) items for an `ocp.args.Composite`
    save (a trainer step)."""
    items = {PARAMS: ocp.args.StandardSave(params), MODEL_CONFIG: ocp.args.JsonSave(model_config_to_dict(cfg))}
    if tokenizer is not None:
        items[TOKENIZER] = TokenizerSave(str(tokenizer))
    return items


def params_restore_args(abstract_params: Any) -> dict[str, ocp.args.CheckpointArgs]:
    """The `params` item for an `ocp.args.Composite` restore into `abstract_params`' shapes, dtypes, shardings."""
    return {PARAMS: ocp.args.StandardRestore(abstract_params)}


def write_step_metadata(directory: Path) -> None:
    """D/_CHECKPOINT_METADATA naming each item's handler, so D reads like a CheckpointManager step."""
    now = time.time_ns()
    handlers = {MODEL_CONFIG: _typestr(ocp.JsonCheckpointHandler), PARAMS: _typestr(ocp.StandardCheckpointHandler)}
    if (directory / TOKENIZER).is_dir():
        handlers[TOKENIZER] = _typestr(TokenizerHandler)
    meta = {
        "item_handlers": handlers,
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
        "custom_metadata": {},
    }
    (directory / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))


def _param_name(path: tuple[str, ...]) -> str:
    return ".".join(path)  # how Orbax names a leaf's array inside the checkpoint


def _tree_metadata(directory: str | Path):
    params = as_path(directory) / PARAMS
    if not params.is_dir():
        raise FileNotFoundError(f"{directory}: no {PARAMS}/ item")
    return ocp.StandardCheckpointHandler().metadata(params)


def _arrays(meta) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = jax.tree_util.tree_flatten_with_path(meta.tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {
        tuple(str(getattr(k, "key", k)) for k in kp): jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
        for kp, m in flat
    }


def stored_arrays(directory: str | Path) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """{path: shape/dtype} of every array in D/params (reads metadata only)."""
    return _arrays(_tree_metadata(directory))


def shape_differences(directory: str | Path, abstract_params: Any) -> list[str]:
    """Arrays of D/params that are missing, extra or of another shape than in `abstract_params` (boxed or not),
    read from metadata only."""
    a = {p: tuple(s.shape) for p, s in stored_arrays(directory).items()}
    b = {p: shape for p, (shape, _) in flat_abstract(abstract_params).items()}
    name = "/".join
    out = [f"{name(k)}: only in the checkpoint" for k in sorted(set(a) - set(b))]
    out += [f"{name(k)}: missing from the checkpoint" for k in sorted(set(b) - set(a))]
    out += [f"{name(k)}: shape {a[k]} (checkpoint) vs {b[k]} (model)" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return out


def check_compatible(directory: str | Path, cfg: ModelConfig, abstract_params: Any) -> None:
    """Raise ValueError naming every config field (architecture and layout) or else every parameter shape by which
    D differs from the model `cfg` / `abstract_params` a caller wants to restore it into."""
    refuse_mismatch(directory, config_differences(read_model_config_dict(directory), cfg)
                    or shape_differences(directory, abstract_params))


def restore_model_params(directory: str | Path, cfg: ModelConfig, abstract_params: Any) -> Any:
    """Params of D, checked against `cfg`, restored into the shardings and dtypes of `abstract_params`
    (ShapeDtypeStructs with shardings): what `init_from` seeds training with."""
    d = as_path(resolve_checkpoint(directory))
    check_compatible(d, cfg, abstract_params)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(d / PARAMS, abstract_params)


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """{path tuple: leaf} -> nested dict."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def restore_params(
    directory: str | Path, cfg: ModelConfig | None = None, shardings: Any = None, dtype: Any = None
) -> dict:
    """The param tree of D as jax.Arrays.

    `shardings`: None (first device), one Sharding for every array, or a tree matching the params.
    `dtype` casts on read. With `cfg`, the stored arrays must be exactly the model's (same layout and shapes).
    """
    stored = stored_arrays(directory)
    if cfg is not None:
        from sail_jax.params import abstract_model_params

        diffs = shape_differences(directory, abstract_model_params(cfg)["params"])
        if diffs:
            raise ConversionError(
                f"{directory}: stored params do not match the model config (scan_layers="
                f"{cfg.runtime.scan_layers}); first differences: {'; '.join(diffs[:4])}"
            )
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = unflatten({p: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype) for p, a in stored.items()})
    if isinstance(shardings, jax.sharding.Sharding):
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), target)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    return ocp.StandardCheckpointer().restore(as_path(directory) / PARAMS, target)


class ParamsWriter:
    """Stream our arrays into D/params slice by slice (see the module docstring for the format)."""

    def __init__(
        self,
        directory: Path,
        leaves: Mapping[tuple[str, ...], Leaf],
        dtypes: Mapping[tuple[str, ...], np.dtype],
        mesh: jax.sharding.AbstractMesh | None = None,
    ):
        from sail_jax.sharding import logical_to_sharding

        self.dir = epath.Path(directory)
        self.dir.mkdir(parents=True)
        self._ctx = _TH.get_ts_context(use_ocdbt=True)
        self._mesh = mesh
        self._leaves = dict(leaves)
        self._dtypes = {p: np.dtype(d) for p, d in dtypes.items()}
        self._shardings = {}
        if mesh is not None:
            for p, leaf in leaves.items():
                names = leaf.names or (None,) * len(leaf.shape)
                self._shardings[p] = logical_to_sharding(names, leaf.shape, mesh)
        self._left = {p: math.prod(leaf.shape[: leaf.stacked]) for p, leaf in leaves.items()}
        self._chunks: dict[tuple[str, ...], list[int]] = {}
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}
        self._txn: ts.Transaction | None = None
        self._staged = 0

    def write_shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        shape = self._leaves[path].shape
        return tuple(self._shardings[path].shard_shape(shape)) if path in self._shardings else shape

    def _store(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._open:
            leaf = self._leaves[path]
            info = _TH.ParamInfo(
                name=_param_name(path), parent_dir=self.dir, is_ocdbt_checkpoint=True, use_zarr3=False,
                use_compression=True, ts_context=self._ctx,
            )
            args = ocp.SaveArgs(shard_axes=tuple(range(leaf.stacked)), chunk_byte_size=CHUNK_BYTES)
            spec = _TH.get_json_tspec_write(
                info, use_ocdbt=True, global_shape=leaf.shape, local_shape=self.write_shape(path),
                dtype=self._dtypes[path], process_index=0, arg=args,
            )
            self._chunks[path] = list(spec["metadata"]["chunks"])
            self._open[path] = ts.open(spec, create=True, open=True, context=self._ctx).result()
        return self._open[path]

    def write(self, path: tuple[str, ...], index: tuple[int, ...], value: np.ndarray) -> None:
        """Write one slice (`index` over the stacked axes; () = the whole array), chunk by chunk.

        `value` may be any strided view (e.g. a transpose): TensorStore copies each chunk out of it directly,
        so the extra memory is a few chunks, not a copy of the tensor. Only a dtype change copies in numpy.
        """
        store = self._store(path)
        region = store[index] if index else store
        chunk = self._chunks[path][len(index):]
        if tuple(value.shape) != tuple(region.shape):
            raise ConversionError(f"{'/'.join(path)}{list(index)}: got shape {value.shape}, expected {region.shape}")
        dtype = self._dtypes[path]
        for box in itertools.product(*(
            [slice(start, min(start + c, n)) for start in range(0, n, c)] for n, c in zip(value.shape, chunk)
        )):
            piece = value[box] if value.dtype == dtype else np.asarray(value[box], dtype)
            if self._txn is None:
                self._txn = ts.Transaction()
            region.with_transaction(self._txn)[box].write(piece).result()  # staged: `piece` may go now
            self._staged += piece.nbytes
            if self._staged >= COMMIT_BYTES:
                self._commit()
        self._left[path] -= 1
        if self._left[path] == 0:
            del self._open[path]  # complete: release the TensorStore handle

    def _commit(self) -> None:
        if self._txn is not None:
            self._txn.commit_async().result()
        self._txn, self._staged = None, 0

    def finalize(self) -> None:
        """Check every slice was written, merge the OCDBT store, write Orbax's metadata files."""
        self._commit()
        partial = sorted("/".join(p) for p, n in self._left.items() if n)
        if partial:
            raise ConversionError(f"arrays not completely written: {partial[:5]}")
        asyncio.run(_TH.merge_ocdbt_per_process_files(self.dir, ts_context=self._ctx, use_zarr3=False))
        kind = "np.ndarray" if self._mesh is None else "jax.Array"
        tree = {}
        for path in self._leaves:
            value = {"value_type": kind, "skip_deserialize": False}
            if self._mesh is not None:
                value["write_shape"] = list(self.write_shape(path))
            tree[str(path)] = {"key_metadata": [{"key": k, "key_type": 2} for k in path], "value_metadata": value}
        meta = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.dir / "_METADATA").write_text(json.dumps(meta))
        if self._mesh is not None:
            self._write_sharding_metadata()

    def _write_sharding_metadata(self) -> None:
        mesh = self._mesh
        shardings = {}
        array_metas = []
        for path, s in self._shardings.items():
            meta = ocp.metadata.NamedShardingMetadata(
                shape=np.asarray(list(mesh.shape.values())), axis_names=list(mesh.axis_names),
                partition_spec=tuple(s.spec), axis_types=tuple(mesh.axis_types),
            )
            key = base64.urlsafe_b64encode(_param_name(path).encode()).decode()
            shardings[key] = meta.to_serialized_string()
            array_metas.append({"array_metadata": {
                "param_name": _param_name(path), "write_shape": list(self.write_shape(path)),
                "chunk_shape": self._chunks[path], "ext_metadata": None,
            }})
        (self.dir / "_sharding").write_text(json.dumps(shardings))
        (self.dir / "array_metadatas").mkdir()
        (self.dir / "array_metadatas" / "process_0").write_text(json.dumps({"array_metadatas": array_metas}))


class ParamsReader:
    """Read slices of the arrays in D/params without loading whole (stacked) arrays."""

    def __init__(self, directory: str | Path):
        self.dir = as_path(directory) / PARAMS
        meta = _tree_metadata(directory)
        self.arrays = _arrays(meta)
        self._use_zarr3 = bool(meta.use_zarr3)
        self._use_ocdbt = _TH.is_ocdbt_checkpoint(self.dir)
        self._ctx = _TH.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}

    def read(self, path: tuple[str, ...], index: tuple[int | slice, ...] = ()) -> np.ndarray:
        if path not in self._open:
            info = _TH.ParamInfo(
                name=_param_name(path), parent_dir=self.dir, is_ocdbt_checkpoint=self._use_ocdbt,
                use_zarr3=self._use_zarr3, ts_context=self._ctx,
            )
            spec = _TH.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            self._open = {path: ts.open(spec, open=True, context=self._ctx).result()}  # one open array at a time
        store = self._open[path]
        return (store[index] if index else store).read().result()
