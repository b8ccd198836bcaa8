"""Compute kernels for the engine's hot path.

Every op has a torch reference (`*_ref`, used on the CPU and as the oracle in tests) and, where
it pays, a Triton kernel for CUDA. `loraplex.kernels.ops` picks one per device; the model never
branches on the device itself.
"""
