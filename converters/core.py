"""Apply the mapping table: HF tensors -> our param tree, and our params -> HF tensors (one at a time)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from converters.mapping import TRANSFORMS, Entry

FLOAT_DTYPES = ("bfloat16", "float16", "float32")


class ConversionError(ValueError):
    """A key is missing, unexpected, or has the wrong shape or dtype; the message names it."""


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


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One of our arrays: its shape, how many leading axes are filled slice by slice, logical axis names."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    stacked: int
    names: tuple[str | None, ...] | None = None

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.shape[self.stacked:]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The mapping-table entries of one layout, resolved against our array shapes."""

    entries: tuple[Entry, ...]
    leaves: dict[tuple[str, ...], Leaf]

    def hf_shape(self, e: Entry) -> tuple[int, ...]:
        return tuple(TRANSFORMS[e.transform].hf_shape(self.leaves[e.path].slice_shape))

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {e.hf_key: self.hf_shape(e) for e in self.entries}


def flat_abstract(abstract: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple | None]]:
    """{path: (shape, logical names or None)} of a boxed or unboxed tree of arrays / ShapeDtypeStructs."""
    import flax.linen as nn

    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    out = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_box)[0]:
        path = tuple(str(getattr(k, "key", k)) for k in kp)
        names = tuple(x.names) if is_box(x) else None
        out[path] = (tuple(nn.unbox(x).shape), names)
    return out


def make_plan(entries: Iterable[Entry], abstract: Any) -> Plan:
    """Resolve `entries` against our param shapes; every array must be exactly covered by the table."""
    entries = tuple(entries)
    flat = flat_abstract(abstract)
    slices: dict[tuple[str, ...], set[tuple[int, ...]]] = {}
    for e in entries:
        if e.path not in flat:
            raise ConversionError(
                f"our param path {'/'.join(e.path)} (for {e.hf_key!r}) is not among the arrays given "
                "(a different model config or layout?)"
            )
        got = slices.setdefault(e.path, set())
        shape = flat[e.path][0]
        if (got and len(next(iter(got))) != len(e.index)) or e.index in got or any(
            not 0 <= i < n for i, n in zip(e.index, shape)
        ):
            raise ConversionError(f"mapping table fills {'/'.join(e.path)} {shape} at {e.index} twice or out of range")
        got.add(e.index)
    uncovered = sorted("/".join(p) for p in flat if p not in slices)
    if uncovered:
        raise ConversionError(f"our params {uncovered[:5]} are not covered by the mapping table")
    leaves = {}
    for path, (shape, names) in flat.items():
        stacked = len(next(iter(slices[path])))
        if len(slices[path]) != math.prod(shape[:stacked]):
            raise ConversionError(
                f"{'/'.join(path)} {shape}: the table fills {len(slices[path])} of "
                f"{math.prod(shape[:stacked])} slices"
            )
        leaves[path] = Leaf(path, shape, stacked, names)
    return Plan(entries, leaves)


def check_source(
    plan: Plan,
    keys: Iterable[str],
    shape_of: Callable[[str], tuple[int, ...]],
    dtype_of: Callable[[str], np.dtype],
    source: str,
) -> None:
    """Missing, unexpected, mis-shaped or non-float tensors of a source; raised before any data is read."""
    keys = set(keys)
    want = plan.hf_shapes()
    missing = [k for k in want if k not in keys]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{source}: missing keys {missing[:5]}{more}")
    unexpected = sorted(keys - set(want))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ConversionError(f"{source}: unexpected keys {unexpected[:5]}{more}")
    for e in plan.entries:
        got = tuple(shape_of(e.hf_key))
        if got != want[e.hf_key]:
            leaf = plan.leaves[e.path]
            raise ConversionError(
                f"{source}: key {e.hf_key!r} has shape {got}, expected {want[e.hf_key]} "
                f"(our {'/'.join(e.path)} {leaf.shape})"
            )
        dt = np.dtype(dtype_of(e.hf_key))
        if dt.name not in FLOAT_DTYPES:
            raise ConversionError(f"{source}: key {e.hf_key!r} has dtype {dt.name}; expected one of {FLOAT_DTYPES}")


def leaf_dtypes(plan: Plan, dtype_of: Callable[[str], np.dtype], source: str) -> dict[tuple[str, ...], np.dtype]:
    """Stored dtype of each of our arrays; all slices of a stacked array must agree."""
    out: dict[tuple[str, ...], tuple[np.dtype, str]] = {}
    for e in plan.entries:
        dt = np.dtype(dtype_of(e.hf_key))
        if e.path in out and out[e.path][0] != dt:
            first_dt, first_key = out[e.path]
            raise ConversionError(
                f"{source}: key {e.hf_key!r} has dtype {dt.name} but {first_key!r} has {first_dt.name}; both fill "
                f"{'/'.join(e.path)} (pass a dtype to convert them to one)"
            )
        out.setdefault(e.path, (dt, e.hf_key))
    return {p: v[0] for p, v in out.items()}
