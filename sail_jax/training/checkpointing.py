"""Sharded Orbax checkpoints with everything an exact resume needs.

Each step directory holds the items
- `params`: the unboxed parameter tree {"vision_model", "mlp1", "language_model"} (StandardSave), and
  `model_config`: `sail_jax.config.to_dict(cfg)` (JsonSave). This pair is the project's model checkpoint
  layout: any directory with these two items (a step directory, or a converter's output) can seed training
  through `init_from`.
- `opt_state` (StandardSave), `train_state` (JSON: step, skip counters, AdaLRS controller state),
- `data_iter`: the data iterator position, one JSON file per process (Grain's own handler for Grain
  iterators, `IteratorSave` for any other iterator with `get_state`/`set_state`),
- `adalrs_params` / `adalrs_opt_state` while an AdaLRS trial holds a rollback snapshot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import grain
import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath

from sail_jax.config import ModelConfig, to_dict

# Runtime fields that change the parameter tree's layout (the others only change how it runs).
LAYOUT_RUNTIME_FIELDS = ("scan_layers",)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1 or self.keep < 1:
            raise ValueError(f"CheckpointConfig.every_steps={self.every_steps} and keep={self.keep} must be >= 1")


class IteratorStateHandler(ocp.CheckpointHandler):
    """Per-process JSON of an iterator state (same file layout as Grain's handler)."""

    def save(self, directory: epath.Path, args: IteratorSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _process_file()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: IteratorRestore) -> Any:
        path = directory / _process_file()
        if not path.exists():
            raise ValueError(f"{path}: no iterator state for this process (was the checkpoint written by a run "
                             f"with a different number of processes?)")
        state = json.loads(path.read_text())
        args.item.set_state(state)
        return args.item

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    state: Any  # taken when the save is issued, so an async save never sees a later position


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    item: Any


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _iter_save_args(it: Any) -> ocp.args.CheckpointArgs:
    if isinstance(it, grain.DatasetIterator):
        return grain.checkpoint.CheckpointSave(it)
    return IteratorSave(it.get_state())


def _iter_restore_args(it: Any) -> ocp.args.CheckpointArgs:
    if isinstance(it, grain.DatasetIterator):
        return grain.checkpoint.CheckpointRestore(it)
    return IteratorRestore(it)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, cfg: ModelConfig) -> list[str]:
    """Architecture fields (plus layout-changing runtime fields) that differ, as 'key: saved -> current'."""
    keep = lambda k: not k.startswith("runtime.") or k.split(".", 1)[1] in LAYOUT_RUNTIME_FIELDS
    a = {k: v for k, v in _flat(saved).items() if keep(k)}
    b = {k: v for k, v in _flat(json.loads(json.dumps(to_dict(cfg)))).items() if keep(k)}
    return [f"{k}: {a.get(k, '<absent>')!r} (checkpoint) vs {b.get(k, '<absent>')!r} (config)"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def shape_differences(saved_meta: Any, abstract_params: Any) -> list[str]:
    a, b = _shapes(saved_meta), _shapes(abstract_params)
    out = [f"{k}: only in the checkpoint" for k in sorted(set(a) - set(b))]
    out += [f"{k}: missing from the checkpoint" for k in sorted(set(b) - set(a))]
    out += [f"{k}: shape {a[k]} (checkpoint) vs {b[k]} (model)" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return out


def check_compatible(where: str, saved_config: dict, saved_params_meta: Any, cfg: ModelConfig,
                     abstract_params: Any) -> None:
    """Raise naming every differing config field / parameter shape."""
    diffs = config_differences(saved_config, cfg) or shape_differences(saved_params_meta, abstract_params)
    if diffs:
        shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
        raise ValueError(f"{where} does not match the configured model:\n  {shown}")


def params_metadata(step_dir: Path) -> Any:
    """Shapes and dtypes of the stored `params` item (no array is read)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.metadata(step_dir / "params").item_metadata


class Checkpointer:
    """The workdir's `checkpoints/` manager."""

    def __init__(self, workdir: str | Path, cfg: CheckpointConfig):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.every_steps = cfg.every_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, cfg: ModelConfig, params: Any, opt_state: Any, train_state: dict, data_iter: Any,
             snapshot: tuple[Any, Any] | None = None, force: bool = False) -> bool:
        """Issue a save every `every_steps` steps (or when `force`d); returns whether it did.

        (Orbax's own `should_save` would also save the first step of a run, a full-state write nobody asked for.)
        """
        if not force and step % self.every_steps:
            return False
        items = {
            "params": ocp.args.StandardSave(params),
            "model_config": ocp.args.JsonSave(to_dict(cfg)),
            "opt_state": ocp.args.StandardSave(opt_state),
            "train_state": ocp.args.JsonSave(train_state),
            "data_iter": _iter_save_args(data_iter),
        }
        if snapshot is not None:
            items["adalrs_params"] = ocp.args.StandardSave(snapshot[0])
            items["adalrs_opt_state"] = ocp.args.StandardSave(snapshot[1])
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, *, cfg: ModelConfig, abstract_params: Any, abstract_opt_state: Any,
                data_iter: Any) -> tuple[Any, Any, dict, tuple[Any, Any] | None]:
        """(params, opt_state, train_state, snapshot or None); the data iterator is positioned in place."""
        step_dir = self.directory / str(step)
        saved_config = self.manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
        check_compatible(f"checkpoint {step_dir}", saved_config["model_config"], params_metadata(step_dir), cfg,
                         abstract_params)
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "opt_state": ocp.args.StandardRestore(abstract_opt_state),
            "train_state": ocp.args.JsonRestore(),
            "data_iter": _iter_restore_args(data_iter),
        }
        has_snapshot = (step_dir / "adalrs_params").is_dir()
        if has_snapshot:
            items["adalrs_params"] = ocp.args.StandardRestore(abstract_params)
            items["adalrs_opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        r = self.manager.restore(step, args=ocp.args.Composite(**items))
        snapshot = (r["adalrs_params"], r["adalrs_opt_state"]) if has_snapshot else None
        return r["params"], r["opt_state"], r["train_state"], snapshot

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_model_checkpoint(directory: str | Path, cfg: ModelConfig, abstract_params: Any) -> Any:
    """Params from a `params/` + `model_config/` directory, checked against `cfg`, restored into the shardings
    and dtypes of `abstract_params` (ShapeDtypeStructs with shardings)."""
    d = Path(directory).absolute()
    for item in ("params", "model_config"):
        if not (d / item).is_dir():
            raise FileNotFoundError(f"{d}: no {item}/ item (expected a sail-jax model checkpoint directory)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        saved = ckptr.restore(d, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))["model_config"]
        check_compatible(f"checkpoint {d}", saved, params_metadata(d), cfg, abstract_params)
        return ckptr.restore(d, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]


def save_model_checkpoint(directory: str | Path, cfg: ModelConfig, params: Any) -> None:
    """Write the `params/` + `model_config/` pair (what converters produce and `init_from` reads)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(Path(directory).absolute(), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(to_dict(cfg))))

