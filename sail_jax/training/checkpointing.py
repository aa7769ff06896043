"""The train-state manager: a run's Orbax CheckpointManager, with everything an exact resume needs.

Each step directory holds the items
- `params` + `model_config`: the model, in the layout `converters/orbax_io.py` owns (written and checked through
  its functions), so any step directory is also a model checkpoint that `init_from`, the converters and
  `sail-jax chat` / `eval` read;
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

from converters.orbax_io import check_compatible, model_save_args, params_restore_args
from sail_jax.config import ModelConfig


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
             snapshot: tuple[Any, Any] | None = None, force: bool = False, tokenizer: str | None = None) -> bool:
        """Issue a save every `every_steps` steps (or when `force`d); returns whether it did.

        (Orbax's own `should_save` would also save the first step of a run, a full-state write nobody asked for.)
        """
        if not force and step % self.every_steps:
            return False
        items = {
            **model_save_args(cfg, params, tokenizer),
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
        check_compatible(step_dir, cfg, abstract_params)
        items = {
            **params_restore_args(abstract_params),
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
