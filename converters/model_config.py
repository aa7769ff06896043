"""Our `model_config/` item: the JSON dict a checkpoint stores beside its `params/`, and which of its fields a config
must match to use those params.

The dict is `dataclasses.asdict(ModelConfig)`: every field by name, sub-configs nested, tuples as JSON lists.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sail_jax.config import (
    AdapterConfig,
    ConfigError,
    LLMConfig,
    ModelConfig,
    MoEConfig,
    RuntimeConfig,
    VisionConfig,
)

# Runtime fields that change the parameter tree's layout (the others only change how it runs).
LAYOUT_RUNTIME_FIELDS = ("scan_layers",)
# How images are fed (tiles or AnyRes, and its pixel budget): the same parameters serve both, so an AnyRes run may
# start from (or be souped with) a tile checkpoint.
INPUT_FIELDS = ("vision.anyres", "vision.min_anyres_patches", "vision.max_anyres_patches")


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """The JSON-friendly dict stored as `model_config/`."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `model_config_to_dict`; unknown keys are an error naming the key."""

    def build(cls, sub: dict, where: str):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(sub) - set(fields)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        kwargs = {}
        for k, v in sub.items():
            if k == "moe":
                kwargs[k] = None if v is None else build(MoEConfig, v, f"{where}.moe")
            elif isinstance(v, list):
                kwargs[k] = tuple(v)
            else:
                kwargs[k] = v
        return cls(**kwargs)

    parts = {"vision": VisionConfig, "adapter": AdapterConfig, "llm": LLMConfig, "runtime": RuntimeConfig}
    unknown = set(d) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"model config: unknown keys {sorted(unknown)}")
    return ModelConfig(**{k: build(parts[k], v, k) if k in parts else v for k, v in d.items()})


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _architecture(d: dict) -> dict[str, Any]:
    """The flat 'part.field' entries of a stored config dict that fix the parameter tree: every field but the
    runtime ones, which count only where they change the layout, and the image-input ones."""
    keep = lambda k: k not in INPUT_FIELDS and (not k.startswith("runtime.") or k.split(".", 1)[1]
                                                 in LAYOUT_RUNTIME_FIELDS)
    return {k: v for k, v in _flat(d).items() if keep(k)}


def config_dict_differences(a: dict, b: dict, labels: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
    """Architecture fields (plus layout-changing runtime fields) in which two stored config dicts differ, as
    'key: a (labels[0]) vs b (labels[1])'. Compares dicts, so a config from another version still reports field by
    field."""
    a, b = _architecture(a), _architecture(b)
    return [f"{k}: {a.get(k, '<absent>')!r} ({labels[0]}) vs {b.get(k, '<absent>')!r} ({labels[1]})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_differences(saved: dict, cfg: ModelConfig) -> list[str]:
    """Fields by which a stored config dict differs from the config `cfg` a caller wants to use its params with."""
    return config_dict_differences(saved, json.loads(json.dumps(model_config_to_dict(cfg))))


def refuse_mismatch(directory: object, diffs: list[str]) -> None:
    """Raise ValueError naming (the first 20 of) `diffs`: the fields or shapes by which the checkpoint `directory`
    differs from the model a caller wants to load it into. Nothing when `diffs` is empty."""
    if diffs:
        shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
        raise ValueError(f"checkpoint {directory} does not match the configured model:\n  {shown}")
