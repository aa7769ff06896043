"""The gin entry point (t5x pattern): configurables are registered here, never in library code.

`train` (sail_jax.training.trainer.train) is wrapped with `gin.configurable` here. Before any user file, the
base bindings declare the required macros and wire them into `train`:

    MODEL = %gin.REQUIRED     # a ModelConfig, usually @model_config() from configs/model/*.gin
    DATA = %gin.REQUIRED      # a data factory, @grain_data or @synthetic_data (not called: the trainer calls it)
    WORKDIR = %gin.REQUIRED   # checkpoints, metrics.jsonl, tensorboard/, config.gin

The model is configured field by field: `model_config.preset` gives the base, and each field bound on
`VisionConfig`, `AdapterConfig`, `LLMConfig`, `MoEConfig`, `RuntimeConfig` or `ModelConfig` (its scalar fields)
replaces that one field of the preset, so a later file or flag changes one field and keeps the rest.

Gin files are parsed in order (later files override earlier ones), then `--gin-bindings` and `--gin.NAME=VALUE`.
Every gin error comes out as one ValueError line naming the file and line, or the binding.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import logging
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gin
from gin import config as gin_config
from gin import resource_reader

from sail_jax.config import (
    AdapterConfig,
    ConfigError,
    LLMConfig,
    ModelConfig,
    MoEConfig,
    RuntimeConfig,
    VisionConfig,
    get_preset,
)
from sail_jax.data.epochs import epoch_steps, grain_packed_rows
from sail_jax.data.pipeline import grain_data
from sail_jax.resources import DATA_ROOT
from sail_jax.training.adalrs import AdaLRSConfig
from sail_jax.training.checkpointing import CheckpointConfig
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.synthetic import synthetic_data
from sail_jax.training.trainer import train

REQUIRED_MACROS = ("MODEL", "DATA", "WORKDIR")
BASE_BINDINGS = (
    *(f"{m} = %gin.REQUIRED" for m in REQUIRED_MACROS),
    "train.model = %MODEL",
    "train.data = %DATA",
    "train.workdir = %WORKDIR",
    "train.optimizer = @OptimizerConfig()",
    "train.checkpoint = @CheckpointConfig()",
)
REPO_ROOT = DATA_ROOT  # holds configs/: the checkout, or the installed package (sail_jax/resources.py)

# The model's parts, bound field by field; a field holding another part is set through that part's own name.
MODEL_PARTS: dict[str, type] = {
    "VisionConfig": VisionConfig, "AdapterConfig": AdapterConfig, "LLMConfig": LLMConfig, "MoEConfig": MoEConfig,
    "RuntimeConfig": RuntimeConfig, "ModelConfig": ModelConfig,
}
NESTED_PARTS = {"LLMConfig": ["moe"], "ModelConfig": ["vision", "adapter", "llm", "runtime"]}
# Configurables `train` calls (their bindings are type-checked against their fields).
RUN_PARTS: dict[str, type] = {
    "OptimizerConfig": OptimizerConfig, "AdaLRSConfig": AdaLRSConfig, "CheckpointConfig": CheckpointConfig,
}


def model_config(preset: str) -> ModelConfig:
    """The preset (`sail_jax.config.PRESETS`) with each field bound on a model part replacing that field."""
    base = get_preset(preset)
    llm = _override(base.llm, "LLMConfig")
    moe_bound = sorted(gin.get_bindings("MoEConfig"))
    if moe_bound:
        if llm.moe is None:
            raise ConfigError(f"MoEConfig.{moe_bound[0]} is bound but preset {preset!r} has no MoE layers")
        llm = dataclasses.replace(llm, moe=_override(llm.moe, "MoEConfig"))
    return _override(base, "ModelConfig", vision=_override(base.vision, "VisionConfig"), llm=llm,
                     adapter=_override(base.adapter, "AdapterConfig"), runtime=_override(base.runtime, "RuntimeConfig"))


def _override(obj: Any, name: str, **parts: Any) -> Any:
    """`obj` with the fields bound on `name` replaced (gin lists become tuples: the configs are frozen, hashable)."""
    changes = {k: _as_tuples(v) if isinstance(v, list) else v for k, v in checked_bindings(name, type(obj)).items()}
    return dataclasses.replace(obj, **changes, **parts)


def checked_bindings(name: str, target: Any, allow_required: bool = False) -> dict[str, Any]:
    """The bindings of configurable `name`, each checked against `target`'s type hints; a `%gin.REQUIRED` one left
    unset is an error unless `allow_required` (then it is returned as `gin.REQUIRED`)."""
    hints = typing.get_type_hints(target)
    with _one_line_errors(None):  # resolving a reference calls its configurable, which gin errors wrap
        bindings = gin.get_bindings(name)
    for key, value in bindings.items():
        if value is gin.REQUIRED:
            if not allow_required:
                raise ValueError(f"{name}.{key} is not set (it is %gin.REQUIRED): add --gin.{name}.{key}=...")
        elif not _matches(value, hints.get(key, Any)):
            raise ValueError(
                f"{name}.{key} = {value!r}: expected {_type_name(hints[key])}, got {type(value).__name__}")
    return bindings


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits `hint` (scalars, None, unions, tuples, sequences, dicts; other hints accept anything)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # an int is a fine float; a bool is neither
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin is tuple or origin is collections.abc.Sequence:
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("collections.abc.", "")


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


_train_with_gin = gin.configurable("train")(train)


def train_using_gin(**kwargs: Any) -> dict[str, float]:
    """`train` with its gin bindings; the data's tokenizer (`grain_data.tokenizer_dir`) goes into the checkpoints
    unless `train.tokenizer_dir` is bound."""
    if "tokenizer_dir" not in gin.get_bindings("train"):
        kwargs.setdefault("tokenizer_dir", data_option("tokenizer_dir", None))
    try:
        return _train_with_gin(**kwargs)
    except Exception as e:
        raise _without_gin_note(e) from None


def _without_gin_note(e: Exception) -> Exception:
    """The trainer's own exception, not gin's proxy of it (which appends "In call to configurable 'train'" on a
    second line): errors of a run are reported in one line."""
    original = e.__context__
    if isinstance(original, Exception) and type(e).__bases__ == (type(original),) and \
            str(e).startswith(str(original)):
        return original.with_traceback(e.__traceback__)
    return e
gin.external_configurable(model_config, "model_config")
gin.external_configurable(synthetic_data, "synthetic_data")
gin.external_configurable(grain_data, "grain_data")
for _name, _cls in {**MODEL_PARTS, **RUN_PARTS}.items():
    gin.external_configurable(_cls, _name, denylist=NESTED_PARTS.get(_name, ()))


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
    """`--gin.NAME=VALUE` flags -> `NAME = VALUE` bindings.

    String values need quotes that survive the shell: --gin.WORKDIR=\\"/tmp/run\\" or --gin.WORKDIR="'/tmp/run'".
    """
    bindings = []
    for a in args:
        name, sep, value = a.removeprefix("--gin.").partition("=")
        if not a.startswith("--gin.") or not sep or not name:
            raise ValueError(f"{a}: expected --gin.NAME=VALUE")
        bindings.append(f"{name} = {value}")
    return bindings


def _package_file_exists(config_path: str) -> bool:
    """gin's package-resource check, minus its crash on namespace packages: with a checkout on the Python path,
    `include 'configs/...'` makes gin look `configs.stage` up as a package, which has no `__init__.py` and so no
    file origin (a TypeError inside gin); such a directory is simply not a package resource, and the search goes on
    to the search paths."""
    try:
        return resource_reader.system_path_file_exists(config_path)
    except TypeError:
        return False


gin_config._FILE_READERS[:] = [  # no public way to replace a registered reader's existence check
    (reader, _package_file_exists if exists is resource_reader.system_path_file_exists else exists)
    for reader, exists in gin_config._FILE_READERS]


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
          required: Sequence[str] = REQUIRED_MACROS, finalize: bool = True) -> None:
    """Reset gin, parse the base bindings, the files and the bindings; check the `required` macros; finalize
    (which also fails on any other `%gin.REQUIRED` left unset: skip it for commands that do not train)."""
    gin.clear_config()
    for p in (*search_paths, str(REPO_ROOT), str(Path.cwd())):
        gin.add_config_file_search_path(p)
    gin.parse_config(BASE_BINDINGS)
    for f in gin_files:
        with _one_line_errors(f"gin file {f}", file_lookup=True):
            gin.parse_config_file(f)
    for b in bindings:
        with _one_line_errors(f"binding {b.strip()!r}"):
            gin.parse_config(b)
    unset = [m for m in required if _is_required(m)]
    if unset:
        raise ValueError(
            "required gin macro(s) not set: " + ", ".join(unset) + " (set them in a --gin-file or with "
            + " ".join(f"--gin.{m}=..." for m in unset) + ")"
        )
    if finalize:
        with _one_line_errors(None):
            gin.finalize()


_GIN_LOCATION = re.compile(r'In file "(?P<file>[^"]+)", line (?P<line>\d+)|In bindings string line (?P<bline>\d+)')
_UNPARSED_TOKEN = re.compile(r"Failed to parse token '([^']*)'")
_UNSET_REQUIRED = re.compile(r"(\S+) set to `%gin.REQUIRED` but not subsequently overridden")


@contextmanager
def _one_line_errors(source: str | None, file_lookup: bool = False) -> Iterator[None]:
    """Turn gin's multi-line errors (message, location, statement) into one ValueError line naming where.

    With `file_lookup`, a TypeError is a file gin could not find: its package-resource lookup fails that way for a
    relative name whose first folder is an importable namespace package (e.g. `configs/` beside the checkout)."""
    logging.disable(logging.ERROR)  # gin logs "Path not found" for every search path it tries
    try:
        yield
    except (ValueError, OSError, SyntaxError) as e:
        raise ValueError(_describe_gin_error(e, source)) from None
    except TypeError as e:
        if not file_lookup:
            raise
        raise ValueError(_describe_gin_error(e, source)) from None
    finally:
        logging.disable(logging.NOTSET)


def _describe_gin_error(e: Exception, source: str | None) -> str:
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "^"]
    where, stmt = source, ""
    if isinstance(e, SyntaxError) and e.filename:
        where = f"{e.filename}, line {e.lineno}: {(e.text or '').strip()}"
    for i, ln in enumerate(lines[1:], 1):
        m = _GIN_LOCATION.match(ln)
        if m:
            stmt = lines[i + 1] if i + 1 < len(lines) else ""
            where = f"{m['file']}, line {m['line']}: {stmt}" if m["file"] else f"binding {stmt!r}"
            break
    token, unset = _UNPARSED_TOKEN.search(text), _UNSET_REQUIRED.match(text)
    include = re.fullmatch(r"include\s+['\"](.+)['\"]", stmt)
    if unset:
        name = unset[1].removesuffix("/macro.value")  # how gin names a macro (e.g. a stage config's data path)
        message = f"{name} is not set (it is %gin.REQUIRED): add --gin.{name}=..."
    elif token:  # a bare word where gin expects a Python literal or @/% reference
        message = f"cannot parse value {token.group(1)!r} (strings need quotes: '{token.group(1)}')"
    elif isinstance(e, (OSError, TypeError)) and (include or source and source.startswith("gin file ")):
        missing = include[1] if include else source.removeprefix("gin file ")
        message = (f"gin file {missing} not found (relative names are looked up in --gin-search-path, the "
                   "repository root and the current directory)")
        where = where if include else None
    else:
        message = lines[0] if lines else type(e).__name__
    return f"{message} (in {where})" if where else message


def _is_required(macro: str) -> bool:
    """A macro still bound to `%gin.REQUIRED` (gin only notices it when a configurable is called)."""
    return repr(gin.query_parameter(f"%{macro}")) == "%gin.REQUIRED"


def train_arguments(names: Sequence[str] | None = None) -> dict[str, Any]:
    """The named keyword arguments of `train` (all but `resume` when None) as the parsed config gives them (its
    defaults where unbound), every binding checked: the model is built (`model_config`), each configurable's
    values match their types, and a `%gin.REQUIRED` one left unset is an error naming the binding. `steps` is
    derived from `train.epochs` when that is set instead (`run_length`)."""
    return resolve_train(names)[0]


def resolve_train(names: Sequence[str] | None = None,
                  cache_in_workdir: bool = True) -> tuple[dict[str, Any], str | None]:
    """`train_arguments`, and the line that says how `steps` came from `train.epochs` (None when bound directly).
    `cache_in_workdir=False` (a dry run) never writes the row count under the workdir."""
    params = inspect.signature(train).parameters
    names = [n for n in params if n != "resume"] if names is None else list(names)
    for name, cls in {**MODEL_PARTS, **RUN_PARTS}.items():
        checked_bindings(name, cls)
    bound = checked_bindings("train", train, allow_required=True)

    def value(name: str) -> Any:
        v = bound.get(name, params[name].default)
        if v is gin.REQUIRED or v is inspect.Parameter.empty:
            raise ValueError(f"train.{name} is not set (it is %gin.REQUIRED): add --gin.train.{name}=...")
        return v

    if bound.get("data", gin.REQUIRED) is not gin.REQUIRED:
        _check_data_factory(bound["data"], complete="data" in names)
    steps, note = run_length(value, cache_in_workdir) if "steps" in names else (None, None)
    return {name: steps if name == "steps" else value(name) for name in names}, note


def run_length(value: Callable[[str], Any], cache_in_workdir: bool) -> tuple[int, str | None]:
    """`train.steps`, or the steps of `train.epochs` passes over the packed rows of the `grain_data` datasets
    (counted once, cached: `data.epochs`) with the line that explains them. Exactly one of the two is set.
    `value(name)` is the resolved `train` argument."""
    steps, epochs = value("steps"), value("epochs")
    if (steps is None) == (epochs is None):
        raise ValueError(f"train.steps = {steps} and train.epochs = {epochs}: set exactly one of them "
                         f"(--gin.train.steps=N or --gin.train.epochs=N, the other = None)")
    if epochs is None:
        return steps, None
    if epochs < 1:
        raise ValueError(f"train.epochs = {epochs}: must be >= 1")
    factory = value("data")
    if getattr(factory, "__name__", None) != "grain_data":
        raise ValueError(f"train.epochs needs a finite dataset: DATA = @grain_data (got "
                         f"{getattr(factory, '__name__', factory)}); give train.steps instead")
    workdir_ = workdir() if cache_in_workdir and not _is_required("WORKDIR") else None
    count = grain_packed_rows(cfg=value("model"), seq_len=value("seq_len"), seed=value("seed"),
                              workdir=workdir_, **checked_bindings("grain_data", grain_data))
    return epoch_steps(epochs, count, value("batch_size"))


def _check_data_factory(factory: Any, complete: bool) -> None:
    """Its bindings have the right types and, when `complete`, each argument the trainer does not pass is set."""
    name = factory.__name__
    bound = checked_bindings(name, factory, allow_required=not complete)
    if not complete:
        return
    passed = inspect.signature(typing.get_type_hints(train)["data"].__call__).parameters
    for param in inspect.signature(factory).parameters.values():
        if (param.default is inspect.Parameter.empty and param.kind is not param.VAR_KEYWORD
                and param.name not in passed and param.name not in bound):
            raise ValueError(f"{name}.{param.name} is not set: add --gin.{name}.{param.name}=...")


def data_option(name: str, default: Any) -> Any:
    """An option of the configured `train.data` factory (e.g. `grain_data.max_tiles`): bound, else the
    factory's own default, else `default`."""
    factory = gin.get_bindings("train").get("data")
    if factory is None or factory is gin.REQUIRED:
        return default
    param = inspect.signature(factory).parameters.get(name)
    if param is not None and param.default is not inspect.Parameter.empty:
        default = param.default
    value = gin.get_bindings(factory).get(name, default)
    return default if value is gin.REQUIRED else value


def workdir() -> str:
    return str(gin.query_parameter("%WORKDIR"))


@contextmanager
def run_workdir(path: str | None = None) -> Iterator[Any]:
    """The run's workdir (`path`, default %WORKDIR; any filesystem) under its lock for the whole run, with the parsed
    configuration written to `config.gin` by process 0 first: the lock comes before anything is written there, so a
    second run on the same workdir changes nothing."""
    import jax

    from sail_jax.files import as_path
    from sail_jax.training import distributed

    directory = as_path(path or workdir())
    with distributed.workdir_lock(directory):
        if jax.process_index() == 0:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "config.gin").write_text(gin.config_str())
        yield directory


def describe(args: dict[str, Any], mesh_shape: dict[str, int], steps_note: str | None = None) -> str:
    """The operative config of a run (what `--dry-run` prints): model, runtime, run (and how `train.epochs` gave
    the steps), optimizer, data, mesh."""
    out = []
    if "model" in args:
        cfg = args["model"]
        top = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in NESTED_PARTS["ModelConfig"]}
        out += [f"model.vision: {cfg.vision}", f"model.adapter: {cfg.adapter}", f"model.llm: {cfg.llm}",
                f"model: {_kwargs(top)}", f"runtime: {cfg.runtime}"]
    run = {k: v for k, v in args.items() if k not in ("model", "data", "optimizer", "adalrs", "checkpoint", "mesh")}
    out.append(f"train: {_kwargs(run)}")
    if steps_note:
        out.append(steps_note)
    out += [f"{k}: {args[k]}" for k in ("optimizer", "adalrs", "checkpoint") if k in args]
    if "data" in args:
        factory = args["data"]
        options = {n: p.default for n, p in inspect.signature(factory).parameters.items()
                   if p.default is not inspect.Parameter.empty}
        out.append(f"data: {factory.__name__}({_kwargs({**options, **gin.get_bindings(factory)})})")
    out.append(f"mesh: {_kwargs(mesh_shape)} (train.mesh = {args.get('mesh')})")
    return "\n".join(out)


def _kwargs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items())
