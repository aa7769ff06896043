"""The original model's remote code and processor files, copied into an export from a directory the user has.

transformers loads a SAIL-VL2 directory through `trust_remote_code=True`: config.json's `auto_map` names
`module.Class` entries whose modules (`module.py`) must sit beside the weights. Our converters write the weights,
config.json and generation_config.json; the code (`*.py`), the processor settings and the chat template are the
original's, copied as they are. The export's `auto_map` is the original's, so its classes are the ones loaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

# Copied besides `*.py` when present (the processor and the chat template the remote code reads).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json")
# Files that name remote-code classes in an `auto_map`, and the sub-configs of config.json that may carry one.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
SUB_CONFIGS = ("vision_config", "llm_config")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _modules(auto_map: Any, where: str) -> dict[str, str]:
    """{module file: 'file: key'} of every local `module.Class` reference (a `repo--module.Class` one names code
    in another repository: not ours to copy)."""
    if not isinstance(auto_map, dict):
        raise ValueError(f"{where}: 'auto_map' must be an object")
    out = {}
    for key, refs in auto_map.items():
        for ref in refs if isinstance(refs, list) else [refs]:
            if ref is None or "--" in ref:
                continue
            if not isinstance(ref, str) or "." not in ref:
                raise ValueError(f"{where}: auto_map[{key!r}] = {ref!r} is not 'module.Class'")
            out[ref.rsplit(".", 1)[0].replace(".", "/") + ".py"] = f"{where}: auto_map[{key!r}]"
    return out


def auto_maps(config: dict) -> dict[str, dict]:
    """The `auto_map`s of an upstream config.json: '' for the top level, else the sub-config's name."""
    out = {"": config["auto_map"]} if "auto_map" in config else {}
    for sub in SUB_CONFIGS:
        if isinstance(config.get(sub), dict) and "auto_map" in config[sub]:
            out[sub] = config[sub]["auto_map"]
    return out


@dataclasses.dataclass(frozen=True)
class RemoteCode:
    """What an export takes from the original directory: files (relative paths) and config.json's `auto_map`s."""

    root: Path
    files: tuple[str, ...]
    auto_maps: dict[str, dict]

    def copy(self, dst: Path) -> None:
        for name in self.files:
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / name, dst / name)


def find_remote_code(original: str | Path) -> RemoteCode:
    """`*.py` and `PROCESSOR_FILES` of `original`, checked before anything is written: every local module an
    `auto_map` (of config.json, its sub-configs, the tokenizer or processor config) names must be there."""
    src = Path(original)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such remote-code directory")
    code = sorted(src.glob("*.py"))
    if not code:
        raise ValueError(f"{src}: no remote code here (no *.py files)")
    needed: dict[str, str] = {}
    maps: dict[str, dict] = {}
    for name in AUTO_MAP_FILES:
        if not (src / name).is_file():
            continue
        data = _read_json(src / name)
        found = auto_maps(data) if name == "config.json" else ({"": data["auto_map"]} if "auto_map" in data else {})
        for sub, auto_map in found.items():
            needed.update(_modules(auto_map, f"{src / name}{'.' + sub if sub else ''}"))
        if name == "config.json":
            maps = found
    missing = [f"{where} names {module}, which is not in {src}" for module, where in needed.items()
               if not (src / module).is_file()]
    if missing:
        raise ValueError(missing[0])
    files = [f.name for f in code] + [n for n in PROCESSOR_FILES if (src / n).is_file()]
    files += [m for m in needed if "/" in m]  # a module in a sub-package (`pkg.module.Class`) keeps its folder
    return RemoteCode(src, tuple(files), maps)


def apply_auto_maps(config: dict, maps: dict[str, dict]) -> dict:
    """`config` (an export's config.json) with the original's `auto_map`s in their places."""
    for sub, auto_map in maps.items():
        target = config if sub == "" else config.setdefault(sub, {})
        target["auto_map"] = auto_map
    return config
