"""The train-state manager: a run's Orbax CheckpointManager, with everything an exact resume needs.

Each step directory holds the items
- `params` + `model_config`: the model, in the layout `converters/orbax_io.py` owns (written and checked through
  its functions), so any step directory is also a model checkpoint that `init_from`, the converters and
  `sail-jax chat` / `eval` read;
- `opt_state` (StandardSave), `train_state` (JSON: step, skip counters, AdaLRS controller state),
- `data_iter`: the data iterator position, one JSON file per process (Grain's own handler for bare Grain
  iterators, `IteratorSave` for any other iterator with `get_state`/`set_state`); a run on another number of
  processes merges them into one global position and re-splits it where the state allows (`data.elastic`),
- `adalrs_params` / `adalrs_opt_state` while an AdaLRS trial holds a rollback snapshot,
- `checksums.json`: size and SHA-256 of every other file of the step, written by process 0 after every item is
  final and before Orbax renames the step into place, so a finalised step always carries it (Orbax's compressed
  chunks carry no checksum of their own: a flipped bit would otherwise restore silently).

Restoring verifies the manifest first; a step that fails (a checksum, a truncated or missing file, an item that
does not decode) is reported in one line, `checkpoint N unreadable: FILE: why`, and `restore_latest` falls back to
the newest step that restores, moving the unreadable newer steps aside into `checkpoints-unreadable/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath

from converters.orbax_io import check_compatible, model_save_args, params_restore_args
from sail_jax.config import ModelConfig
from sail_jax.data.elastic import NotResplittable, merge_states
from sail_jax.data.pipeline import DataConfigMismatch
from sail_jax.files import as_path, files_under, is_url, write_text_atomic
from sail_jax.training import distributed

MANIFEST = "checksums.json"
UNREADABLE_DIR = "checkpoints-unreadable"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1 or self.keep < 1:
            raise ValueError(f"CheckpointConfig.every_steps={self.every_steps} and keep={self.keep} must be >= 1")


class IteratorStateHandler(ocp.CheckpointHandler):
    """Per-process JSON of an iterator state (same file layout as Grain's handler). A run with another number of
    processes merges every old process's state into a global position and takes its part (`data.elastic`)."""

    def save(self, directory: epath.Path, args: IteratorSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _process_file()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: IteratorRestore) -> Any:
        path = directory / _process_file()
        if path.exists():
            state = _read_state(path)
        else:
            old = sorted(directory.glob("process_*-of-*.json"), key=lambda p: int(p.name[8:].split("-")[0]))
            if not old or len(old) != int(old[0].stem.split("-of-")[1]):
                raise ValueError(f"{directory}: no complete set of per-process iterator states")
            state = merge_states([_read_state(p) for p in old], jax.process_count())
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


def _read_state(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: iterator state is not valid JSON ({e})") from None


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


class CheckpointUnreadable(Exception):
    """A step directory that cannot be restored as written (corrupt, truncated or missing files)."""

    def __init__(self, step: int, detail: str):
        super().__init__(f"checkpoint {step} unreadable: {detail}")
        self.step = step


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); the run stops rather than go on unsaved."""


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message` (library errors can run to hundreds of lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(step_dir: str | Path) -> None:
    """`checksums.json`: {relative path: size, sha256} of every file under `step_dir` (atomic), except the step's
    own `_CHECKPOINT_METADATA`, which Orbax rewrites when it commits the step."""
    step_dir = as_path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().length, "sha256": _sha256(p)}
             for p in files_under(step_dir)
             if p.parent != step_dir or p.name not in (MANIFEST, "_CHECKPOINT_METADATA")}
    write_text_atomic(step_dir / MANIFEST, json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def verify_manifest(step_dir: str | Path, step: int) -> bool:
    """Check every file against `checksums.json`; False when the step has none (written before checksums
    existed), raises CheckpointUnreadable naming the first bad file."""
    step_dir = as_path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise CheckpointUnreadable(step, f"{MANIFEST}: not a valid checksum manifest") from None
    for rel, want in files.items():
        f = step_dir / rel
        if not f.is_file():
            item = rel.split("/")[0]
            what = f"{item}/: missing item" if "/" in rel and not (step_dir / item).is_dir() else f"{rel}: missing"
            raise CheckpointUnreadable(step, what)
        size = f.stat().length
        if size < want["size"]:
            raise CheckpointUnreadable(step, f"{rel}: truncated ({size} of {want['size']} bytes)")
        if size != want["size"] or _sha256(f) != want["sha256"]:
            raise CheckpointUnreadable(step, f"{rel}: checksum mismatch (the file changed after it was written)")
    return True


@contextlib.contextmanager
def claim_workdir(workdir: str | Path, cfg: CheckpointConfig) -> Iterator[Checkpointer]:
    """The run's checkpoint manager in `workdir` (created), under the workdir's exclusive lock for the whole run, so
    a second run on the same workdir is refused instead of interleaving with this one."""
    path = as_path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    with distributed.workdir_lock(path):
        yield Checkpointer(path, cfg)


class Checkpointer:
    """The workdir's `checkpoints/` manager."""

    def __init__(self, workdir: str | Path, cfg: CheckpointConfig):
        self.workdir = as_path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.every_steps = cfg.every_steps
        self.async_save = cfg.async_save
        self._saving: int | None = None
        # Always Orbax's async checkpointer (the manifest is written by its post-finalization callback, which runs
        # before the step is renamed into place); `async_save=False` waits for each save. Temporary directories of
        # a save that was killed are removed when the manager starts. The step directory is created in the
        # calling thread: created asynchronously, a failed creation left the other save threads waiting for its
        # signal for the whole async timeout (20 minutes) while the loop went on, a run that looked hung.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep, enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal,
                                           create_directories_asynchronously=False),
        )
        if is_url(self.directory) and jax.process_index() == 0:
            _remove_partial_steps(self.directory)
        distributed.barrier("sail_jax_partial_steps")
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        logging.getLogger("absl").addFilter(_drop_orbax_thread_errors)

    def _seal(self) -> None:
        """Write the manifest of the step being committed into its (still temporary) directory."""
        if jax.process_index() != 0 or self._saving is None:
            return
        tmp = sorted(self.directory.glob(f"{self._saving}.orbax-checkpoint-tmp*"))
        final = self.directory / str(self._saving)
        step_dir = tmp[-1] if tmp else final  # object stores commit in place (no temporary directory)
        write_manifest(step_dir)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def resumable_step(self, resume: bool, unit: str, flag: str) -> int | None:
        """The newest step to resume from (None: start fresh); a fresh run into a workdir that holds checkpoints is
        refused, naming `flag`, so nothing is overwritten by accident."""
        latest = self.latest_step()
        if latest is not None and not resume:
            raise ValueError(f"{self.directory} already holds checkpoints (latest {unit} {latest}); pass --resume "
                             f"({flag}=True) to continue, or use another workdir")
        return latest if resume else None

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
        self.wait()  # the previous save is sealed before `_saving` moves on
        self._saving = step
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise CheckpointSaveFailed(f"saving checkpoint {step} in {self.directory} failed: {_first_line(e)}") from e
        if not self.async_save:
            self.wait()
        return saved

    def restore(self, step: int, *, cfg: ModelConfig, abstract_params: Any, abstract_opt_state: Any,
                data_iter: Any) -> tuple[Any, Any, dict, tuple[Any, Any] | None]:
        """(params, opt_state, train_state, snapshot or None); the data iterator is positioned in place."""
        step_dir = self.directory / str(step)
        verify_manifest(step_dir, step)
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
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (DataConfigMismatch, NotResplittable) as e:  # the user's settings, not a damaged step: no fallback
            raise type(e)(f"checkpoint {step}: {e}") from None
        except Exception as e:  # any item that does not decode: the step is unusable, whatever the library says
            raise CheckpointUnreadable(step, _first_line(e)) from e
        snapshot = (r["adalrs_params"], r["adalrs_opt_state"]) if has_snapshot else None
        return r["params"], r["opt_state"], r["train_state"], snapshot

    def restore_latest(self, warn: Callable[[str], None], **kwargs: Any) -> tuple[int, tuple]:
        """(step, `restore(step, ...)`) of the newest step that restores; unreadable newer steps are reported
        through `warn` and moved into `checkpoints-unreadable/` once an older one has restored."""
        bad: list[int] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, **kwargs)
            except CheckpointUnreadable as e:
                warn(f"{e}; trying the previous checkpoint")
                bad.append(step)
                continue
            if bad:
                moved = self._move_aside(bad)
                warn(f"resuming from checkpoint {step}, the newest that verifies; moved the unreadable "
                     f"step(s) {bad} to {moved}")
            return step, restored
        raise ValueError(f"no checkpoint in {self.directory} can be restored (steps {bad} are unreadable, see "
                         f"above); start a new workdir without --resume")

    def _move_aside(self, steps: list[int]) -> epath.Path:
        target = self.directory.parent / UNREADABLE_DIR
        if jax.process_index() == 0:
            target.mkdir(exist_ok=True)
            for step in steps:
                _move(self.directory / str(step), target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        distributed.barrier("sail_jax_move_unreadable")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Wait for the save in flight; its failure (in Orbax's background thread) is raised here."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveFailed(f"saving checkpoint {self._saving} in {self.directory} failed: "
                                       f"{_first_line(e)}") from e

    def finish(self, raise_errors: bool = True) -> None:
        """Wait for the last save and close the manager; `raise_errors=False` (the run already failed) keeps the
        first error the one reported."""
        try:
            self.wait()
            self.close()
        except Exception:
            if raise_errors:
                raise

    def close(self) -> None:
        self.manager.close()
        logging.getLogger("absl").removeFilter(_drop_orbax_thread_errors)


def _remove_partial_steps(directory: epath.Path) -> None:
    """Delete the step directories that a killed save left on an object store. There Orbax writes a step in place
    and marks it complete last (`commit_success.txt`); a partial step is never restored, but a new save of the same
    step would find the old objects (and OCDBT would read its stale manifest)."""
    if not directory.is_dir():
        return
    for d in directory.iterdir():
        if d.name.isdigit() and not ocp.step.is_path_finalized(d):
            print(f"removing {d}: an incomplete checkpoint (its save was interrupted)", file=sys.stderr, flush=True)
            d.rmtree()


def _move(src: epath.Path, dst: epath.Path) -> None:
    """Move a step directory: a rename locally; on an object store (no directories to rename) a copy of every
    object, then the source removed."""
    if not is_url(src):
        shutil.move(src, dst)
        return
    for f in files_under(src):
        (dst / f.relative_to(src).as_posix()).parent.mkdir(parents=True, exist_ok=True)
        f.copy(dst / f.relative_to(src).as_posix())
    src.rmtree()


def _drop_orbax_thread_errors(record: logging.LogRecord) -> bool:
    """Orbax logs a failed save with a traceback from each of its writer threads (hundreds of lines when the disk
    is full); the same error reaches `Checkpointer.wait`/`save`, which report it once, as CheckpointSaveFailed."""
    return not (record.levelno >= logging.ERROR and f"{Path('orbax', 'checkpoint')}" in record.pathname)
