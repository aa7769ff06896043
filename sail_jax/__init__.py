"""sail-jax: a JAX/Flax reimplementation of SAIL-VL2 (arXiv 2509.14033)."""

__version__ = "0.1.0"
