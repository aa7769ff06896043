"""Our own Pallas kernels (packed flash attention, MoE routing + grouped matmul).

Every kernel has a TPU (Mosaic) and a GPU (Triton) lowering, a pure-jnp reference beside it, and runs on CPU in
interpret mode so the test suite exercises the same kernel bodies that ship to accelerators.
"""
