"""MoE kernels: routing (softmax/top-k/sort order) and grouped matmul (gmm, with tgmm for its weight gradient) for
TPU and GPU."""

from pallas_kernels.moe.gmm import gmm
from pallas_kernels.moe.routing import route

__all__ = ["gmm", "route"]
