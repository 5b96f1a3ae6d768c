"""CUDA backend: GPU kernels launched from compiled host entries, device code built by nvcc.

linear.py lists the rules of the other linear-kernel modules (gemm, gemv, gemv_tc) and those
modules read linear.py's shapes, so linear.py is loaded first whichever module is asked for.
"""

from mlcc.backends.cuda import linear  # noqa: F401
