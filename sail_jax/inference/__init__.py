"""Inference: numerics entry points, generation and evaluation."""
