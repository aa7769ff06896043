"""Assemble an upstream-format SAIL-VL2 directory from released parts: a transformers Qwen3 / Qwen3-MoE language
model, a vision tower (transformers `Aimv2VisionModel`, a SAIL-ViT directory, or the ViT of a SAIL-VL2
directory) and a freshly initialised adapter: the starting point of stage I (SAIL-ViT + a language-pretrained
LLM + a random adapter).

The output holds every key of the upstream schema (`mapping.model_entries`), config.json (`hf_config`) and the
LLM's tokenizer. The image-token ids come from that tokenizer; one without `<IMG_CONTEXT>` gets the SAIL-VL2
special tokens appended (a Qwen3 tokenizer then gives them the release's ids, 151669-151677). When the tokenizer
is longer than the embedding, the embedding and lm_head grow to its length and each new row is the mean of the
existing rows (InternVL's choice for tokens it adds; transformers' mean-resizing samples around that mean). All
sources are checked (keys, shapes) before anything is written; the destination appears only when complete.
The sources and the destination may be URLs (`gs://...`): a source is read from its local copy
(`hf_checkpoint.local_upstream_dir`), the destination uploaded when complete (`convert.atomic_destination`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converters.core import ConversionError, check_source, make_plan
from converters.hf_checkpoint import INDEX_NAME, SafetensorsCheckpoint, local_upstream_dir
from converters.hf_config import generation_config_dict, llm_config_from_hf, sailvl_config_dict, vision_config_from_hf
from converters.hf_writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_safetensors_dir
from converters.mapping import TRANSFORMS, aimv2_sources, model_entries
from sail_jax.config import LLMConfig, ModelConfig, VisionConfig, get_preset
from sail_jax.files import as_path, is_url

# The tokens SAIL-VL2 adds to the Qwen3 tokenizer, in the release's id order (all special).
SAIL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
_NOT_TOKENIZER = ("config.json", "generation_config.json", INDEX_NAME)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
# fields of a part that are training settings, not architecture: never compared with a preset
_NOT_ARCHITECTURE = {"vocab_size", "max_position_embeddings", "tie_word_embeddings", "router_aux_loss_coef",
                     "router_z_loss_coef", "capacity_factor"}
Getter = Callable[[], np.ndarray]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


# ----------------------------------------------------------------------------------------------------------
# The parts, each as upstream-named tensors: {upstream key: (upstream shape, getter)}


@dataclasses.dataclass
class Part:
    """One source directory seen as upstream SAIL-VL2 tensors."""

    tensors: dict[str, tuple[tuple[int, ...], Getter]]
    dtypes: set[str]


def _unused(ckpt: SafetensorsCheckpoint, used: set[str], where: str, ignore: Callable[[str], bool]) -> None:
    extra = sorted(k for k in ckpt.keys() if k not in used and not ignore(k))
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ConversionError(f"{where}: tensors the assembled model has no place for: {extra[:5]}{more}")


def _need(ckpt: SafetensorsCheckpoint, key: str, where: str, target: str) -> tuple[int, ...]:
    if key not in ckpt:
        raise ConversionError(f"{where}: missing tensor {key!r} (needed for {target})")
    return ckpt.shape(key)


def llm_part(ckpt: SafetensorsCheckpoint, llm: LLMConfig, tied: bool, rows: int, where: str) -> Part:
    """The language model's tensors under `language_model.`; a tied model without `lm_head.weight` gets the
    embedding as its lm_head, and `rows` > vocab_size appends mean rows to both."""
    tensors: dict[str, tuple[tuple[int, ...], Getter]] = {}
    used: set[str] = set()
    for e in model_entries(ModelConfig(llm=llm), False):
        if not e.hf_key.startswith("language_model."):
            continue
        key = e.hf_key.removeprefix("language_model.")
        if key == "lm_head.weight" and key not in ckpt and tied:
            key = "model.embed_tokens.weight"
        shape = _need(ckpt, key, where, e.hf_key)
        used.add(key)
        getter = lambda key=key: ckpt[key]
        if key in ("model.embed_tokens.weight", "lm_head.weight") and rows > shape[0]:
            getter = lambda key=key: _grow(ckpt[key], rows)
            shape = (rows, *shape[1:])
        tensors[e.hf_key] = (shape, getter)
    _unused(ckpt, used, where, lambda k: False)
    return Part(tensors, {ckpt.dtype(k).name for k in used})


def _grow(x: np.ndarray, rows: int) -> np.ndarray:
    mean = x.astype(np.float64).mean(axis=0).astype(x.dtype)
    return np.concatenate([x, np.broadcast_to(mean, (rows - x.shape[0], *x.shape[1:]))])


def native_positions(grid: int, width: int) -> np.ndarray:
    """A native AIMv2's fixed 2-D sin-cos position table on a grid x grid patch grid, [1, grid^2, width], laid out
    [sin_w | cos_w | sin_h | cos_h] (the order AIMv2 was trained with), computed in float64 as transformers does."""
    if width % 4:
        raise ConversionError(f"native AIMv2 positions need a width divisible by 4, got {width}")
    omega = 1.0 / 10000.0 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    h, w = (a.reshape(-1) for a in np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij"))
    eh, ew = np.outer(h, omega), np.outer(w, omega)
    return np.concatenate([np.sin(ew), np.cos(ew), np.sin(eh), np.cos(eh)], axis=1)[None]


def _prefix_of(ckpt: SafetensorsCheckpoint, suffix: str) -> str | None:
    return next((k.removesuffix(suffix) for k in ckpt.keys() if k.endswith(suffix)), None)


def vision_part(ckpt: SafetensorsCheckpoint, config: dict, image_size: int, where: str) -> tuple[VisionConfig, Part]:
    """(SAIL-ViT config, tensors under `vision_model.`) of a transformers AIMv2 vision directory (native or
    not; its pooling head, if any, is left out), a SAIL-ViT directory, or a SAIL-VL2 directory's ViT."""
    aim = _prefix_of(ckpt, "embeddings.patch_embed.weight")
    if aim is not None:
        d = config.get("vision_config", config)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConversionError(f"{where}: hidden_act={act!r}; SAIL-ViT uses 'silu'")
        qkv_bias, mlp_bias = bool(d.get("qkv_bias", False)), bool(d.get("mlp_bias", False))
        if qkv_bias != mlp_bias:
            raise ConversionError(f"{where}: qkv_bias={qkv_bias} with mlp_bias={mlp_bias} has no SAIL-ViT equivalent "
                                  "(SAIL-ViT's use_bias covers the attention output and the MLP together)")
        native = bool(d.get("is_native", False))
        cfg = VisionConfig(
            hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
            image_size=image_size if native else int(d.get("image_size", 224)), patch_size=int(d.get("patch_size", 14)),
            num_channels=int(d.get("num_channels", 3)), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            qkv_bias=qkv_bias, use_bias=mlp_bias,
        )
        tensors: dict[str, tuple[tuple[int, ...], Getter]] = {}
        used: set[str] = set()
        for sail, parts in aimv2_sources(cfg, native).items():
            keys = [aim + p for p in parts]
            shapes = [_need(ckpt, k, where, sail) for k in keys]
            used.update(keys)
            shape = (sum(s[0] for s in shapes), *shapes[0][1:])
            if sail.endswith("pos_embed"):
                shape = (1, *shape)
            tensors[sail] = (shape, lambda keys=keys, shape=shape: np.concatenate([ckpt[k] for k in keys])
                             .reshape(shape))
        if native:
            table = native_positions(cfg.grid_size, cfg.hidden_size)
            tensors["vision_model.preprocessor.pos_embed"] = (table.shape, lambda: table.astype(np.float32))
        _unused(ckpt, used, where, lambda k: not k.startswith(aim) or k.startswith(aim + "head."))
        return cfg, Part(tensors, {ckpt.dtype(k).name for k in used})
    sail_prefix = _prefix_of(ckpt, "preprocessor.patchifier.proj.weight")
    if sail_prefix is None:
        raise ConversionError(f"{where}: neither a transformers AIMv2 vision model (embeddings.patch_embed.weight) "
                              "nor a SAIL-ViT (preprocessor.patchifier.proj.weight)")
    cfg = vision_config_from_hf(config.get("vision_config", config), f"{where}/config.json")
    if config.get("force_image_size"):
        cfg = dataclasses.replace(cfg, image_size=int(config["force_image_size"]))
    tensors, used = {}, set()
    for e in model_entries(ModelConfig(vision=cfg), False):
        if e.hf_key.startswith("vision_model."):
            key = sail_prefix + e.hf_key.removeprefix("vision_model.")
            tensors[e.hf_key] = (_need(ckpt, key, where, e.hf_key), lambda key=key: ckpt[key])
            used.add(key)
    _unused(ckpt, used, where, lambda k: not k.startswith(sail_prefix) or k.startswith(sail_prefix + "head."))
    return cfg, Part(tensors, {ckpt.dtype(k).name for k in used})


def adapter_part(cfg: ModelConfig, seed: int) -> Part:
    """A fresh `mlp1` with our model's initialisers (PixelShuffleAdapter.init under PRNGKey(seed))."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sail_jax.models.adapter import PixelShuffleAdapter

    adapter = PixelShuffleAdapter(cfg.adapter, cfg.llm.hidden_size)
    s = adapter.scale
    x = jnp.zeros((1, s * s, cfg.vision.hidden_size), jnp.float32)
    params = nn.unbox(jax.jit(adapter.init, static_argnums=2)(jax.random.PRNGKey(seed), x, (s, s)))["params"]
    tensors = {}
    for e in model_entries(cfg, False):
        if e.hf_key.startswith("mlp1."):
            y = TRANSFORMS[e.transform].to_hf(np.asarray(params[e.path[1]][e.path[2]], np.float32))
            tensors[e.hf_key] = (tuple(y.shape), lambda y=y: y)
    return Part(tensors, {"float32"})


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def _added_tokens(directory: Path) -> dict[str, int]:
    """Added tokens (content -> id) of a tokenizer directory, from whichever files it has."""
    out: dict[str, int] = {}
    if (directory / "tokenizer.json").is_file():
        listed = _read_json(directory / "tokenizer.json").get("added_tokens", [])
        out.update({t["content"]: int(t["id"]) for t in listed})
    if (directory / "tokenizer_config.json").is_file():
        decoder = _read_json(directory / "tokenizer_config.json").get("added_tokens_decoder") or {}
        out.update({t["content"]: int(i) for i, t in decoder.items()})
    if (directory / "added_tokens.json").is_file():
        out.update({k: int(v) for k, v in _read_json(directory / "added_tokens.json").items()})
    return out


def _tokenizer_length(directory: Path) -> int:
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if not (directory / "vocab.json").is_file():
        raise FileNotFoundError(f"{directory}: holds no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    ids = [*_read_json(directory / "vocab.json").values(), *_added_tokens(directory).values()]
    return max(ids) + 1


def copy_tokenizer(src: Path, dst: Path) -> tuple[dict[str, int], int, list[str]]:
    """Copy the tokenizer files of `src` into `dst`, adding the SAIL-VL2 tokens when `<IMG_CONTEXT>` is missing;
    (SAIL token -> id, tokenizer length, what was changed)."""
    length = _tokenizer_length(src)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _NOT_TOKENIZER and f.suffix not in _WEIGHT_SUFFIXES:
            shutil.copy2(f, dst / f.name)
    added = _added_tokens(src)
    notes = []
    if "<IMG_CONTEXT>" not in added:
        new = [t for t in SAIL_TOKENS if t not in added]
        ids = {t: length + i for i, t in enumerate(new)}
        _add_tokens(dst, ids)
        notes.append(f"the tokenizer had no <IMG_CONTEXT>: added the SAIL-VL2 special tokens {' '.join(new)} "
                     f"(ids {length}-{length + len(new) - 1})")
        length += len(new)
        added = _added_tokens(dst)
    return {t: added[t] for t in SAIL_TOKENS if t in added}, length, notes


def _add_tokens(directory: Path, ids: dict[str, int]) -> None:
    """Append special tokens to every tokenizer file of `directory` that lists added tokens."""
    entry = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                       "special": True}
    path = directory / "tokenizer.json"
    if path.is_file():
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ids])
        got = {t: tok.token_to_id(t) for t in ids}
        if got != ids:
            raise ConversionError(f"{path}: the added tokens got ids {got}, expected {ids}")
        tok.save(str(path))
    path = directory / "tokenizer_config.json"
    if path.is_file():
        d = _read_json(path)
        d["added_tokens_decoder"] = {**(d.get("added_tokens_decoder") or {}), **{str(i): entry(t) for t, i in
                                                                                 ids.items()}}
        path.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    path = directory / "added_tokens.json"
    if path.is_file() or not (directory / "tokenizer_config.json").is_file():
        d = _read_json(path) if path.is_file() else {}
        path.write_text(json.dumps({**d, **ids}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------


def _preset_differences(name: str, part: Any, preset_part: Any, prefix: str = "") -> list[str]:
    """'field=value but preset NAME has value' for every architecture field where `part` differs."""
    if (part is None) != (preset_part is None):
        return [f"{prefix.rstrip('.') or 'moe'}={'set' if part else 'none'} but preset {name!r} has the other"]
    out = []
    for f in dataclasses.fields(part):
        a, b = getattr(part, f.name), getattr(preset_part, f.name)
        if f.name in _NOT_ARCHITECTURE:
            continue
        if dataclasses.is_dataclass(a) or dataclasses.is_dataclass(b):
            out += _preset_differences(name, a, b, f"{prefix}{f.name}.")
        elif a != b:
            out.append(f"{prefix}{f.name}={a!r} but preset {name!r} has {b!r}")
    return out


def assemble(
    llm: str | Path,
    vision: str | Path,
    dst: str | Path,
    *,
    adapter_seed: int = 0,
    preset: str | None = None,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> tuple[ModelConfig, list[str]]:
    """Write the SAIL-VL2 directory `dst` from an LLM directory and a vision directory; (its config, notes on what
    was added or resized). `preset` supplies the model-level settings (adapter, select_layer, template, tiling,
    the tile size of a native AIMv2) and, when given, the parts' architectures must match it."""
    from converters.convert import atomic_destination

    # Read from local directories (a URL: its local copy); messages name the directories as given.
    llm_dir, vit_dir = local_upstream_dir(llm), local_upstream_dir(vision)
    llm, vision = (as_path(p) if is_url(p) else Path(p) for p in (llm, vision))
    base = get_preset(preset) if preset else ModelConfig()
    llm_json = _read_json(llm_dir / "config.json")
    if llm_json.get("model_type") not in ("qwen3", "qwen3_moe"):
        raise ConversionError(f"--llm {llm}: model_type={llm_json.get('model_type')!r}; expected 'qwen3' or "
                              "'qwen3_moe'")
    llm_cfg = llm_config_from_hf(llm_json, f"{llm}/config.json")
    with SafetensorsCheckpoint(llm_dir) as llm_ckpt, SafetensorsCheckpoint(vit_dir) as vit_ckpt:
        vit_cfg, vit = vision_part(vit_ckpt, _read_json(vit_dir / "config.json"), base.vision.image_size,
                                   f"--vision {vision}")
        if preset:
            diffs = (_preset_differences(preset, vit_cfg, base.vision, "vision.")
                     + _preset_differences(preset, llm_cfg, base.llm, "llm."))
            if diffs:
                raise ConversionError(f"the parts do not match --preset {preset}: {'; '.join(diffs[:4])}")
        with atomic_destination(dst, overwrite) as tmp:
            ids, length, notes = copy_tokenizer(llm_dir, tmp)
            rows = max(llm_cfg.vocab_size, length)
            if rows > llm_cfg.vocab_size:
                notes.append(f"the tokenizer has {length} tokens: grew the embedding and lm_head from "
                             f"{llm_cfg.vocab_size} to {rows} rows, each new row the mean of the existing rows")
            lm = llm_part(llm_ckpt, llm_cfg, bool(llm_json.get("tie_word_embeddings", False)), rows, f"--llm {llm}")
            cfg = base.replace(vision=vit_cfg, llm=dataclasses.replace(llm_cfg, vocab_size=rows),
                               img_context_token_id=ids["<IMG_CONTEXT>"])
            mlp1 = adapter_part(cfg, adapter_seed)
            tensors = {**vit.tensors, **mlp1.tensors, **lm.tensors}
            from sail_jax.params import abstract_model_params

            plan = make_plan(model_entries(cfg, False), abstract_model_params(cfg.with_runtime(scan_layers=False))
                             ["params"])
            check_source(plan, tensors, lambda k: tensors[k][0], lambda k: np.dtype("float32"), "the assembled parts")
            names = vit.dtypes | lm.dtypes
            stored = dtype or (names.pop() if len(names) == 1 else "float32")
            specs = [TensorSpec(e.hf_key, tensors[e.hf_key][0], np.dtype(stored)) for e in plan.entries]
            write_safetensors_dir(tmp, specs, lambda k: tensors[k][1](), max_shard_size)
            (tmp / "config.json").write_text(json.dumps(sailvl_config_dict(cfg, stored), indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(), indent=2) + "\n")
    return cfg, notes
