"""Device mesh and the ONE logical-axis-rules table.

Every parameter and main activation in sail-jax carries logical axis names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`). This module maps those names onto the mesh axes `data`, `fsdp`, `tensor`,
`expert`. A dimension that a mesh axis does not divide is left replicated instead of failing, so tiny test
models and odd head counts run on any mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# (logical name, mesh axes). First the activations, then parameters. MoE activations and expert weights have
# their own names so the expert axis can be placed deliberately (a missing 'expert' here costs whole-x
# slowdowns on real pods).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_batch_moe", ("data", "fsdp", "expert")),
    ("activation_exp", "expert"),
    ("activation_mlp_moe", "tensor"),
    ("activation_tiles", ("data", "fsdp", "expert")),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("layers", None),
    ("norm", None),
    ("exp", "expert"),
    ("embed_moe", "fsdp"),
    ("mlp_moe", "tensor"),
    ("patch", None),
    ("vit_positions", None),
)


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    expert: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A 4-axis mesh with Auto axis types (linen logical constraints need Auto, not Explicit).

    One axis may be -1 to take all remaining devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor, expert]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if len(devices) % rest:
            raise ValueError(f"{len(devices)} devices cannot be split as {dict(zip(MESH_AXES, shape))}")
        shape[shape.index(-1)] = len(devices) // rest
    if math.prod(shape) != len(devices):
        if math.prod(shape) > len(devices):
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices; {len(devices)} available"
            )
        devices = devices[: math.prod(shape)]
    arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_spec(spec: dict[str, int] | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh from a {'data': 2, 'tensor': 2, ...} dict (missing axes = 1) over `devices` (default: all)."""
    spec = dict(spec or {})
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    return make_mesh(**spec, devices=devices)


def target_platform() -> str:
    """The platform the code being traced will run on: that of the current mesh's devices (which may be
    compile-only devices of another platform, for ahead-of-time compilation), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device  # works inside jit and shard_map too
    return device.platform if device is not None and device.platform else jax.default_backend()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
    """Make `mesh` and the logical rules current (for jit, logical constraints and shard_map)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (replicate instead of failing)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept: list[str] = []
        for a in axes:
            size = math.prod(mesh.shape[x] for x in kept + [a])
            if dim % size == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def active_mesh_axes(logical: str, mesh: Any, dim: int | None = None) -> tuple[str, ...]:
    """Mesh axes (of size > 1) the current logical rules map `logical` to; with `dim`, only as many leading
    axes as divide it (the rest replicate, as for parameters)."""
    rules = nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if dim is not None:
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
    return axes


def logical_to_sharding(
    logical_axes: Sequence[str | None] | PartitionSpec,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> NamedSharding:
    """NamedSharding for one array with the given logical axis names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return NamedSharding(mesh, _fit_spec(spec, shape, mesh))


def tree_shardings(
    boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> Any:
    """NamedShardings for a tree of (abstract) arrays boxed in `nn.LogicallyPartitioned` (from init/eval_shape).

    Unboxed leaves are replicated.
    """

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return logical_to_sharding(x.names, x.value.shape, mesh, rules)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Boxed ShapeDtypeStruct tree of `model.init(PRNGKey(0), *args)` without allocating anything."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
    return logical_to_sharding(("activation_batch",) + (None,) * (len(shape) - 1), shape, mesh)


def count_params(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))
