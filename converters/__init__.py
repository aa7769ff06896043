"""Weight converters between upstream SAIL-VL2 / transformers checkpoints and sail-jax params."""
