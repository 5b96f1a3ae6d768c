"""Device code for the GPU languages TVM generates itself: Metal, OpenCL, WebGPU (WGSL), ROCm."""
