"""Host stand-ins shared by the emulations that run generated CUDA source as C++ threads."""

# kernels.py's storage helpers (mlcc_f32, mlcc_put, mlcc_round) on the host's float and half,
# and its pdl wait (a no-op, as on a GPU without pdl)
MLCC_HOST = r"""inline float mlcc_f32(float v) { return v; }
inline float mlcc_f32(half v) { return (float)v; }
inline void mlcc_put(float* p, long long i, float v) { p[i] = v; }
inline void mlcc_put(half* p, long long i, float v) { p[i] = (half)v; }
inline float mlcc_round(float v, const float*) { return v; }
inline float mlcc_round(float v, const half*) { return (float)(half)v; }
inline void mlcc_grid_wait() {}  // kernels run one after another: nothing to wait for
"""
