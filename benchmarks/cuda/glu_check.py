"""Validate the fused gate_up + silu_mul kernels at the Llama-2-7B shape on the GPU.

    python benchmarks/cuda/glu_check.py build .device/glu
    PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 \
        python3 benchmarks/cuda/glu_check.py run .device/glu $OUT/glu_check.json

`build` writes one library with the GLU-mode tensor-core GEMM (prefill, symbolic rows) at the
tile the compiler picks for the shape and at the narrow tile, and the GLU-mode persistent GEMV
(decode, one row) with the launch the compiler picks. `run` feeds random packed weights, scales
and activations, computes silu(g) * u in torch from float32 products of the dequantized weights
(g and u rounded to float16 first, as the kernels do), and reports for each kernel and row
count the largest error relative to the largest reference value and whether two calls on the
same inputs return the same bytes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_bench import dequantized, spec_for

N, K = 22016, 4096  # the 7B gate_up
ROWS = (1, 7, 32, 100, 512)  # the GEMMs' row counts (the GEMV takes one row)


def build(folder: Path) -> None:
    from mlcc.backends.cuda import gemm, glu
    from mlcc.backends.cuda.codegen import compile_library
    from mlcc.backends.cuda.gemv import gemv_q4_persistent_kernel
    from mlcc.backends.cuda.linear import LinearShape
    from mlcc.backends.plan import KernelSpec

    s = LinearShape(spec_for(N, K, "q4", "float16", False))
    kernels = [gemm.gemm_tc_kernel(s, "glu_gemm_chosen", gemm.choose_tile(s, True), glu=True),
               gemm.gemm_tc_kernel(s, "glu_gemm_narrow", gemm.NARROW_TILE, glu=True),
               gemm.gemm_tc_kernel(s, "gate_up_gemm_chosen", gemm.choose_tile(s, True))]
    one = spec_for(N, K, "q4", "float16", False)
    one = KernelSpec(one.op, (((1, K), "float16"),) + one.inputs[1:],
                     (((1, N), "float16"),), one.attrs)
    c = glu.glu_gemv_config(N, K)
    kernels.append(gemv_q4_persistent_kernel(LinearShape(one), "glu_gemv", c.blocks_per_sm,
                                             c.warps, c.rows_per_warp, dot=c.dot,
                                             rotate=c.rotate, pingpong=c.pingpong,
                                             glu=glu.SILU_MUL))
    folder.mkdir(parents=True, exist_ok=True)
    compile_library(kernels, "", "", folder / "glu_check.so")
    print(f"built {len(kernels)} kernels; chosen tile {gemm.choose_tile(s, True).tag}")


def run(folder: Path, out: Path) -> None:
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    dev = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / "glu_check.so"))
    rng = np.random.default_rng(0)
    qw = rng.integers(0, 2**32, (N, K // 8), dtype=np.uint32)
    qs = (rng.random((N, K // 32)) * 0.02 + 0.001).astype(np.float16)
    w = dequantized(torch, [qw, qs], "q4")
    weights = [tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev)]
    rows = []
    for name in ("glu_gemm_chosen", "glu_gemm_narrow", "gate_up_gemm_chosen", "glu_gemv"):
        for m in ((1,) if name == "glu_gemv" else ROWS):
            x = rng.standard_normal((m, K)).astype(np.float16)
            gu = (torch.from_numpy(x).cuda().float() @ w.T).half().float()
            glu_out = name != "gate_up_gemm_chosen"
            if glu_out:
                g, u = gu[:, :N // 2], gu[:, N // 2:]
                expected = g / (1.0 + torch.exp(-g)) * u
            else:
                expected = gu
            width = N // 2 if glu_out else N
            got = []
            for _ in range(2):
                y = tvm.runtime.tensor(np.full((m, width), np.nan, np.float16), dev)
                lib[name](tvm.runtime.tensor(x, dev), *weights, y)
                got.append(y.numpy())
            diff = torch.from_numpy(got[0].astype(np.float32)).cuda() - expected
            row = {"kernel": name, "rows": m,
                   "rel_err": float(diff.abs().max() / expected.abs().max()),
                   "nan": int(np.isnan(got[0]).sum()),
                   "repeatable": bool(np.array_equal(got[0].view(np.uint16),
                                                     got[1].view(np.uint16)))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "command": "python " + " ".join(sys.argv), "rows": rows},
                              indent=1))


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))


if __name__ == "__main__":
    main()
