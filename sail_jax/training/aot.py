"""Ahead-of-time compilation of the train step, for devices this host may not have.

A pod team sizes a run before it holds the slice: `compile_train_step` lowers and compiles the very jitted step
that `train` runs (same model, optimizer, trainable groups, mesh, loss budget and batch shapes) against the
devices of a mesh, which may be the compile-only devices of a named TPU topology (`topology_devices`, needs
libtpu but no TPU), and reports what XLA will allocate on each device. With gradient accumulation the
temporaries are those of one micro-batch (plus the float32 gradient accumulator). Nothing is allocated: parameters,
optimizer state and batch are `ShapeDtypeStruct`s carrying their shardings.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sail_jax.config import ModelConfig
from sail_jax.data.batch import abstract_batch, batch_shards
from sail_jax.params import parameter_counts
from sail_jax.sharding import use_mesh
from sail_jax.training.metrics import peak_flops_per_device, step_flops
from sail_jax.training.optim import OptimizerConfig
from sail_jax.training.program import build_program

GIB = 1024**3
# HBM per TPU chip, matched as substrings of `device_kind.lower()` in order (public spec sheets); attached
# devices that report their memory (GPUs) use that instead.
HBM_BYTES: tuple[tuple[str, int], ...] = (
    ("v6 lite", 32 * GIB), ("v5 lite", 16 * GIB), ("v5p", 95 * GIB), ("v5", 95 * GIB), ("v4", 32 * GIB),
)
LIBTPU_HINT = "describing a TPU topology needs libtpu (pip install 'libtpu==0.0.42.*', the release jax 0.10.2 pins)"


def topology_devices(topology: str | None) -> list[jax.Device]:
    """Compile-only devices of a TPU topology such as 'v5p:4x4x4' or 'v5e:4x8'; None: this process's devices."""
    if not topology:
        return jax.devices()
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu missing, or a name it does not know: say which, and how to fix it
        raise ValueError(f"topology {topology!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
                         f"{LIBTPU_HINT}") from e


def hbm_bytes(device_kind: str, device: jax.Device | None = None) -> int | None:
    """Memory of one device: what an attached device reports, else the TPU table, else None (e.g. CPU)."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit") if device is not None else None
    except Exception:  # compile-only devices have no memory to report
        limit = None
    if limit:
        return int(limit)
    kind = device_kind.lower()
    return next((v for k, v in HBM_BYTES if k in kind), None)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device figures of one compiled train step (bytes unless named otherwise)."""

    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    parameters: int
    argument_bytes: int  # parameters, optimizer state and batch shards held by one device
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (counted once)
    temp_bytes: int  # activations, gradients and scratch at the step's peak
    code_bytes: int
    model_flops_per_device: float  # `metrics.step_flops` with every token, target slot and tile slot real
    peak_flops: float  # dense bf16 FLOP/s of one device (`metrics.PEAK_FLOPS`)
    hbm_bytes: int | None
    compile_s: float
    microbatches: int = 1  # gradient accumulation: temporaries hold one micro-batch's activations

    @property
    def min_step_s(self) -> float:
        """Step time at 100% model-FLOPs utilisation: a lower bound."""
        return self.model_flops_per_device / self.peak_flops

    @property
    def peak_bytes(self) -> int:
        """What the step needs resident on one device: arguments + fresh outputs + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "fits": self.fits,
                "min_step_s": self.min_step_s}

    def summary(self) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"
        fit = "fits" if self.fits else "DOES NOT FIT"
        hbm = "" if self.hbm_bytes is None else f" of {g(self.hbm_bytes)} HBM ({fit})"
        f = self.model_flops_per_device
        flops = (f"; {f / 1e12:.0f} model TFLOP" if f >= 1e12 else f"; {f / 1e9:.1f} model GFLOP") + (
            f" per device per step, >= {self.min_step_s:.3g} s at peak")
        micro = f", {self.microbatches} micro-batches" if self.microbatches > 1 else ""
        return (f"{self.num_devices} x {self.device_kind}, mesh {self.mesh}{micro}, "
                f"{self.parameters / 1e9:.2f}B params: "
                f"per device {g(self.peak_bytes)}{hbm} = arguments {g(self.argument_bytes)} + outputs "
                f"{g(self.output_bytes)} - donated {g(self.alias_bytes)} + temporaries {g(self.temp_bytes)} + code "
                f"{g(self.code_bytes)}{flops}; compiled in {self.compile_s:.0f} s")


def compile_train_step(
    *,
    model: ModelConfig,
    batch_size: int,
    seq_len: int,
    max_tiles: int,
    devices: Sequence[jax.Device] | None = None,
    trainable: Sequence[str] = ("vision", "adapter", "llm"),
    optimizer: OptimizerConfig = OptimizerConfig(),
    mesh: dict[str, int] | None = None,
    target_fraction: float = 1.0,
    steps: int = 1,
    microbatches: int = 1,
    tile_budget: int | None = None,
) -> tuple[jax.stages.Compiled, CompileReport]:
    """Compile `train`'s step (`program.build_program`) for `devices` (default: this process's) and measure it;
    arguments as `train`'s, `max_tiles` the tile slots per row (an AnyRes model: patch slots), or with
    `tile_budget` the tiles per batch shard (and micro-batch) that the ViT runs on (`data.tile_budget`)."""
    if max_tiles < 0 or (tile_budget is not None and tile_budget < 0):
        raise ValueError(f"max_tiles={max_tiles} and tile_budget={tile_budget} must be >= 0")
    t0 = time.perf_counter()
    program = build_program(model=model, batch_size=batch_size, seq_len=seq_len, steps=steps, trainable=trainable,
                            optimizer=optimizer, mesh=mesh, target_fraction=target_fraction,
                            microbatches=microbatches, devices=devices)
    mesh_, targets_per_row, trainable = program.mesh, program.targets_per_row, program.trainable
    with use_mesh(mesh_):
        groups = batch_shards(mesh_) * microbatches
        batch = abstract_batch(model, batch_size, seq_len, max_tiles, mesh_, tile_budget, groups)
        compiled = program.step.lower(program.abstract_state, batch, np.int32(0), np.float32(1.0)).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    device = mesh_.devices.flat[0]
    kind = device.device_kind
    # XLA's own cost analysis counts a scanned layer stack once, so the model's FLOPs come from the config.
    if model.vision.anyres:  # patches, in tile equivalents
        tiles = batch_size * max_tiles / model.vision.num_patches
    else:  # the slots the ViT runs on
        tiles = batch_size * max_tiles if tile_budget is None else groups * tile_budget
    flops = step_flops(model, tokens=batch_size * seq_len, targets=batch_size * targets_per_row,
                       tiles=tiles, seq_len=seq_len, trainable=trainable)
    report = CompileReport(
        device_kind=kind, num_devices=mesh_.size, mesh={a: int(s) for a, s in mesh_.shape.items()},
        parameters=parameter_counts(model)["total"],
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        model_flops_per_device=flops / mesh_.size, peak_flops=peak_flops_per_device(device_kind=kind)[0],
        hbm_bytes=hbm_bytes(kind, device), compile_s=seconds, microbatches=microbatches,
    )
    return compiled, report
