"""MoE kernels: routing (softmax/top-k/sort order) and grouped matmul (gmm / tgmm) for TPU and GPU."""

from pallas_kernels.moe.gmm import gmm, tgmm
from pallas_kernels.moe.routing import route

__all__ = ["gmm", "route", "tgmm"]
