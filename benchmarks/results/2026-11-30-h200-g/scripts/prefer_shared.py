"""Run a script (ab_decode.py) with every CompiledEngine's CUDA context set to prefer shared
memory over L1 (cuCtxSetCacheConfig(CU_FUNC_CACHE_PREFER_SHARED)) once the engine is made: a
probe of whether the SM's shared-memory carveout keeps the o_proj GEMV's blocks off the SMs
that run the decode attention.

    python prefer_shared.py benchmarks/ab_decode.py ARGS...
"""
import ctypes
import runpy
import sys

from mlcc.runtime_check import compiled

plain = compiled.CompiledEngine.__init__


def init(self, *args, **kwargs):
    plain(self, *args, **kwargs)
    cuda = ctypes.CDLL("libcuda.so.1")
    rc = cuda.cuCtxSetCacheConfig(ctypes.c_int(1))
    now = ctypes.c_int(-1)
    cuda.cuCtxGetCacheConfig(ctypes.byref(now))
    print(f"cuCtxSetCacheConfig(PREFER_SHARED) -> {rc}; the context's config: {now.value}",
          file=sys.stderr)


compiled.CompiledEngine.__init__ = init
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
