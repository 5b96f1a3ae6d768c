"""CUDA backend: GPU kernels launched from compiled host entries, device code built by nvcc."""
