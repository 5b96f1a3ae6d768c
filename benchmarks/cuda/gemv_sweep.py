"""Validate-then-benchmark sweep of the q4 decode GEMV's block shapes (the tuning database).

Build here (TVM compiler + nvcc), run on the GPU machine (TVM runtime + torch):

    python benchmarks/cuda/gemv_sweep.py build .device/sweep
    python benchmarks/cuda/gemv_sweep.py run .device/sweep $OUT/gemv_sweep.json

`build` writes one library with a kernel per (shape, warps, features per warp) for the decode
GEMVs of the Llama-2-7B shape. `run` checks every variant against a float32 reference of the
same packed weights (random codes and scales) and, if it agrees, times 48 back-to-back calls
replayed as one CUDA graph, cycling through copies of the weights that
together hold 120 MB or more (beyond the 50 MB L2), median of 7 replays. The JSON
holds every variant and the fastest per shape; copy it to mlcc/backends/cuda/gemv_tuning.json to
make those the defaults.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
WARPS = (4, 8)
ROWS = (1, 2, 4, 8)
DOTS = {"shift": "mlcc_q4_dot8", "masked": "mlcc_q4_dot8_masked"}


def variants() -> list[dict]:
    out = []
    for n, k in SHAPES:
        iters = -(-(k // 32) // 32)
        for warps in WARPS:
            for rows in ROWS:
                for tag, dot in DOTS.items():
                    if rows * iters <= 32 and (tag == "shift" or rows in (2, 4)):
                        out.append({"n": n, "k": k, "warps": warps, "rows_per_warp": rows,
                                    "dot": dot, "name": f"gemv_{n}_{k}_w{warps}_r{rows}_{tag}"})
    return out


def build(folder: Path) -> None:
    from mlcc.backends.cuda.codegen import compile_library
    from mlcc.backends.cuda.linear import LinearShape, gemv_q4_kernel
    from mlcc.backends.plan import KernelSpec

    kernels = []
    for v in variants():
        n, k = v["n"], v["k"]
        spec = KernelSpec("q_linear", (((1, k), "float16"), ((n, k // 8), "uint32"),
                                       ((n, k // 32), "float16")), (((1, n), "float16"),),
                          (("bits", 4), ("group_size", 32), ("in_features", k)))
        kernels.append(gemv_q4_kernel(LinearShape(spec), v["name"], v["warps"],
                                      v["rows_per_warp"], dot=v["dot"]))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    compile_library(kernels, "", "", folder / "gemv_sweep.so")
    (folder / "variants.json").write_text(json.dumps(variants(), indent=1))
    print(f"built {len(kernels)} variants in {time.perf_counter() - start:.1f} s")


def reference(qw: np.ndarray, qs: np.ndarray, x: np.ndarray) -> np.ndarray:
    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((qw[:, :, None] >> shifts) & 15).reshape(qw.shape[0], -1).astype(np.float32)
    w = (codes - 7.0) * np.repeat(qs.astype(np.float32), 32, axis=1)
    return w @ x.astype(np.float32)


def run(folder: Path, out: Path) -> None:
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    dev = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / "gemv_sweep.so"))
    rng = np.random.default_rng(0)
    results, best = [], {}
    for n, k in SHAPES:
        copies = []
        nbytes = n * k // 2 + n * k // 16
        for _ in range(max(4, -(-120_000_000 // nbytes))):  # together well beyond the L2
            qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
            qs = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
            copies.append((qw, qs, tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev)))
        x = rng.standard_normal((1, k)).astype(np.float16)
        x_dev, y_dev = tvm.runtime.tensor(x, dev), tvm.runtime.empty((1, n), "float16", dev)
        expected = reference(copies[0][0], copies[0][1], x[0])
        for v in [v for v in variants() if (v["n"], v["k"]) == (n, k)]:
            f = lib[v["name"]]
            f(x_dev, copies[0][2], copies[0][3], y_dev)
            err = float(np.abs(y_dev.numpy()[0].astype(np.float32) - expected).max() /
                        np.abs(expected).max())
            row = dict(v, rel_err=err)
            if err < 1e-2:
                row["us"] = time_variant(torch, f, x_dev, copies, y_dev)
                row["gb_s"] = (n * k // 2 + n * k // 16) / (row["us"] * 1e-6) / 1e9
                key = f"{n},{k}"
                if key not in best or row["us"] < best[key]["us"]:
                    best[key] = {kk: row[kk] for kk in ("warps", "rows_per_warp", "dot", "us",
                                                          "gb_s")}
            results.append(row)
            print(f"{v['name']:34s} err {err:.1e} " +
                  (f"{row['us']:7.2f} us {row['gb_s']:6.0f} GB/s" if "us" in row else "FAILED"))
    doc = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime()),
           "command": "python " + " ".join(sys.argv), "best": best, "variants": results}
    out.write_text(json.dumps(doc, indent=1))


def time_variant(torch, f, x_dev, copies, y_dev, calls: int = 48, repeats: int = 7) -> float:
    """Median time per call of `calls` back-to-back calls replayed as one CUDA graph (no
    launch gaps from Python), cycling through the four weight copies."""
    import tvm_ffi

    for i in range(len(copies)):
        f(x_dev, copies[i][2], copies[i][3], y_dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
        for i in range(calls):
            f(x_dev, copies[i % len(copies)][2], copies[i % len(copies)][3], y_dev)
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000 / calls)
    return float(np.median(times))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
