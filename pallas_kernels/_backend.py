"""Backend selection shared by every kernel: which lowering (Mosaic/Triton) and whether to interpret.

`backend=None` follows `platform`, the platform the traced code will run on: callers that compile for a mesh pass
its devices' platform (an ahead-of-time compile for a TPU topology from a CPU host must pick Mosaic), and None means
`jax.default_backend()`. TPU -> "mosaic", GPU -> "triton". On CPU nothing compiles, so the kernels run in interpret
mode; there `backend` picks which kernel body is interpreted ("triton" by default: the generic interpreter is the
faster one, "mosaic" runs under TPU interpret mode, which simulates VMEM/SMEM and DMAs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS: tuple[str, ...] = ("mosaic", "triton")
_PLATFORM_BACKEND = {"tpu": "mosaic", "gpu": "triton", "cuda": "triton", "rocm": "triton"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved (backend, interpret) pair; hashable so it can be a static argument."""

    backend: str
    interpret: bool

    def interpret_arg(self) -> Any:
        """The value for `pallas_call(interpret=...)`."""
        if not self.interpret:
            return False
        return pltpu.InterpretParams() if self.backend == "mosaic" else True

    def compiler_params(self, *, dimension_semantics: tuple[str, ...] = (), num_warps: int = 4,
                        num_stages: int = 2) -> Any:
        """Backend-specific compiler parameters (grid semantics for Mosaic, warps/stages for Triton)."""
        if self.backend == "mosaic":
            return pltpu.CompilerParams(dimension_semantics=dimension_semantics or None)
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def resolve(backend: str | None, interpret: bool | None, platform: str | None) -> Target:
    """Pick the lowering from the target platform unless told; on CPU interpret unless told not to.

    `interpret=False` on a CPU host is allowed on purpose: it is how the kernels are lowered ahead of time for a
    TPU/GPU target (`jit(...).trace(...).lower(lowering_platforms=("tpu",))`), which the tests use to check that
    both lowerings accept the kernels. Running such a call on CPU fails in Pallas ("only interpret mode").
    """
    platform = platform or jax.default_backend()
    if backend is None:
        backend = _PLATFORM_BACKEND.get(platform, "triton")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS} or None")
    if interpret is None:
        interpret = platform not in _PLATFORM_BACKEND
    return Target(backend, bool(interpret))


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) accumulated in float32; exact fp32 (no TF32) when the operands are fp32."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def check_float_dtype(name: str, x: jax.Array) -> None:
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, bfloat16, float16")
