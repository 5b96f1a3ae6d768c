"""Sampling kernels of every CUDA library: the next token chosen on the GPU, one int32 back.

Without them each decoded token downloads the whole float32 logits row (128 KB for a 32k
vocabulary, more for 150k) and picks on the host. Both kernels run as one block of 1024
threads over the library's logits row (float32, vocab entries) and write one token id:

    mlcc_argmax(logits, token)          the first index of the largest logit, as np.argmax
                                        (NaN entries are never chosen)
    mlcc_sample(logits, params, token)  params = float64 (temperature, u), u uniform in [0, 1):
                                        softmax of logits / temperature, then the first index
                                        whose cumulative probability exceeds u

`mlcc_sample` follows mlcc.runtime_check.sampling.TokenSampler for top_p = 1 without
repetition penalty: weights exp(l / T - max(l / T)) in float32 (IEEE division), sums and the
cumulative distribution in float64, the pick `searchsorted(cdf, u * total, side="right")`
clamped to the last token. Each thread owns one contiguous segment of the vocabulary; the
segment sums are scanned across the block (shuffles within a warp, then the warps' totals),
and the one thread whose segment holds the threshold walks it.
"""

from __future__ import annotations

from mlcc.backends.cuda.kernels import CudaKernel, launcher

THREADS = 1024
FUNCTIONS = ("mlcc_argmax", "mlcc_sample")


def _argmax_source(vocab: int) -> str:
    return f"""__device__ __forceinline__ int mlcc_argmax_dev(const float* __restrict__ logits,
                                               int* __restrict__ token) {{
  __shared__ float best_v[32];
  __shared__ int best_i[32];
  float v = -INFINITY;
  int idx = 0x7fffffff;
  // increasing i with a strict comparison keeps each thread's first maximum
  for (int i = threadIdx.x; i < {vocab}; i += {THREADS}) {{
    const float x = logits[i];
    if (x > v) {{ v = x; idx = i; }}
  }}
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) {{
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) {{ v = ov; idx = oi; }}
  }}
  if (lane == 0) {{ best_v[warp] = v; best_i[warp] = idx; }}
  __syncthreads();
  if (warp == 0) {{
    v = best_v[lane];
    idx = best_i[lane];
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {{
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
      if (ov > v || (ov == v && oi < idx)) {{ v = ov; idx = oi; }}
    }}
    // every entry NaN or -inf: token 0, as np.argmax of an all -inf row
    if (lane == 0) token[0] = idx == 0x7fffffff ? 0 : idx;
  }}
  return 0;
}}
"""


def _sample_source(vocab: int) -> str:
    seg = -(-vocab // THREADS)
    return f"""__device__ __forceinline__ int mlcc_sample_dev(const float* __restrict__ logits,
                                              const double* __restrict__ params,
                                              int* __restrict__ token) {{
  __shared__ float maxes[32];
  __shared__ double scratch[32];
  __shared__ int picked;
  const float temperature = (float)params[0];
  const double u = params[1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int lo = threadIdx.x * {seg}, hi = min(lo + {seg}, {vocab});
  // 1. the largest scaled logit
  float m = -INFINITY;
  for (int i = lo; i < hi; ++i) m = fmaxf(m, __fdiv_rn(logits[i], temperature));
  m = mlcc_warp_max(m);
  if (lane == 0) maxes[warp] = m;
  if (threadIdx.x == 0) picked = {vocab - 1};
  __syncthreads();
  m = maxes[0];
  for (int w = 1; w < {THREADS // 32}; ++w) m = fmaxf(m, maxes[w]);
  // 2. this segment's mass, then an exclusive scan of the segments in thread order
  double mine = 0.0;
  for (int i = lo; i < hi; ++i) mine += (double)expf(__fdiv_rn(logits[i], temperature) - m);
  double incl = mine;  // inclusive scan within the warp, then across the warps' totals
  #pragma unroll
  for (int o = 1; o < 32; o <<= 1) {{
    const double other = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += other;
  }}
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  double before = __shfl_up_sync(0xffffffffu, incl, 1), total = 0.0;
  if (lane == 0) before = 0.0;
  for (int w = 0; w < {THREADS // 32}; ++w) {{
    if (w == warp) before += total;
    total += scratch[w];
  }}
  // 3. the first token whose cumulative mass exceeds u * total
  const double threshold = u * total;
  if (before <= threshold && threshold < before + mine) {{
    double run = before;
    for (int i = lo; i < hi; ++i) {{
      run += (double)expf(__fdiv_rn(logits[i], temperature) - m);
      if (run > threshold || i == hi - 1) {{ atomicMin(&picked, i); break; }}
    }}
  }}
  __syncthreads();
  if (threadIdx.x == 0) token[0] = picked;
  return 0;
}}
"""


def sampling_kernels(vocab: int) -> list[CudaKernel]:
    """The two sampling kernels for a logits row of `vocab` float32 entries."""
    logits = ("logits", (vocab,), "float32")
    token = ("token", (1,), "int32")
    grid = ("T.int64(1)",)
    return [
        CudaKernel("mlcc_argmax", _argmax_source(vocab),
                   launcher("mlcc_argmax", [logits, token], grid, THREADS, [])),
        CudaKernel("mlcc_sample", _sample_source(vocab),
                   launcher("mlcc_sample", [logits, ("params", (2,), "float64"), token], grid,
                            THREADS, [])),
    ]
