"""Helpers shared by the Pallas kernel tests (interpret mode on CPU)."""

from __future__ import annotations

import functools

import jax
import numpy as np

# Interpret-mode kernels are cheap to run and expensive to compile; LLVM -O0 halves the compile time of these
# test programs (XLA's own HLO optimisations still run, so the numerics are those of a normal build).
interpret_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def assert_close(name: str, got, want, tol: float) -> None:
    """max |got - want| / max(1, max |want|) <= tol, and no NaN/inf in `got`."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= tol, f"{name}: scaled max error {err:.3g} > {tol}"
