"""Apply the mapping table: HF tensors -> our param tree, and our params -> HF tensors (one at a time)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from converters.mapping import TRANSFORMS, Entry


class ConversionError(ValueError):
    """A key is missing, unexpected, or has the wrong shape; the message names it."""


def _shape_dtype_tree(abstract: Any) -> dict:
    import flax.linen as nn

    return nn.unbox(abstract)


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for p in path:
        if p not in tree:
            raise ConversionError(f"our param path {'/'.join(path)} does not exist in the model")
        tree = tree[p]
    return tree


def import_params(
    entries: Iterable[Entry],
    get_tensor: Callable[[str], np.ndarray],
    abstract_params: Any,
    available_keys: Iterable[str] | None = None,
    dtype: Any = None,
    source: str = "checkpoint",
) -> dict:
    """Build our (unboxed) param tree as numpy arrays from HF tensors.

    `abstract_params` is the `params` collection of `jax.eval_shape(model.init, ...)`. Every entry's HF key
    must exist (`get_tensor` raises KeyError otherwise) with the shape the transform expects; with
    `available_keys`, keys not consumed by any entry are an error too. `dtype` overrides the stored dtype
    (default: keep the model's param dtype).
    """
    shapes = _shape_dtype_tree(abstract_params)
    out: dict = {}
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], np.ndarray] = {}
    used: set[str] = set()
    for e in entries:
        leaf = _get_path(shapes, e.path)
        full_shape = tuple(leaf.shape)
        slice_shape = full_shape[len(e.index):]
        tr = TRANSFORMS[e.transform]
        want = tuple(tr.hf_shape(slice_shape))
        try:
            x = get_tensor(e.hf_key)
        except KeyError:
            raise ConversionError(f"{source}: missing key {e.hf_key!r} (needed for {'/'.join(e.path)})") from None
        if tuple(x.shape) != want:
            raise ConversionError(
                f"{source}: key {e.hf_key!r} has shape {tuple(x.shape)}, expected {want} "
                f"(our {'/'.join(e.path)} {full_shape})"
            )
        used.add(e.hf_key)
        target_dtype = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)
        y = np.asarray(tr.to_ours(np.asarray(x), slice_shape)).astype(target_dtype, copy=False)
        if not e.index:
            _set_path(out, e.path, y)
            continue
        if e.path not in buffers:
            buffers[e.path] = np.empty(full_shape, target_dtype)
            filled[e.path] = np.zeros(full_shape[: len(e.index)], bool)
        buffers[e.path][e.index] = y
        filled[e.path][e.index] = True
    for path, buf in buffers.items():
        if not filled[path].all():
            raise ConversionError(
                f"{source}: {'/'.join(path)} filled {int(filled[path].sum())} of {filled[path].size} slices"
            )
        _set_path(out, path, buf)
    if available_keys is not None:
        unexpected = sorted(set(available_keys) - used)
        if unexpected:
            more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
            raise ConversionError(f"{source}: unexpected keys {unexpected[:5]}{more}")
    missing = [
        "/".join(str(getattr(k, "key", k)) for k in kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
        if _lookup(out, kp) is None
    ]
    if missing:
        raise ConversionError(f"{source}: our params {missing[:5]} are not covered by the mapping table")
    return out


def _lookup(tree: Mapping, keypath) -> Any:
    for k in keypath:
        k = getattr(k, "key", k)
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def export_tensors(entries: Iterable[Entry], params: Mapping, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_key, array) one tensor at a time from our (unboxed) params."""
    for e in entries:
        arr = _get_path(params, e.path)
        y = np.asarray(arr[e.index] if e.index else arr)
        x = TRANSFORMS[e.transform].to_hf(y)
        if dtype is not None:
            x = x.astype(dtype)
        yield e.hf_key, x
