"""Packed flash attention (segment ids, causal or bidirectional, GQA) for TPU (Mosaic) and GPU (Triton)."""

from pallas_kernels.attention.api import packed_attention

__all__ = ["packed_attention"]
