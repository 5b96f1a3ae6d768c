"""Validate-then-benchmark the prefill GEMMs: tensor-core tiles (gemm.py) against gemm_wmma.

Build here (TVM compiler + nvcc), run on the GPU machine (TVM runtime + torch):

    python benchmarks/cuda/gemm_bench.py build .device/gemm
    PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 \
        python3 benchmarks/cuda/gemm_bench.py run .device/gemm $OUT/gemm_bench.json

(.device/site: the runtime-only TVM of benchmarks/cuda/prepare_device_run.py.)

`build` writes one library holding, for each case (a linear shape of the Llama-2-7B model with
its dtypes), the current 64x64 WMMA kernel and the tensor-core GEMM at several tiles; rows are
symbolic, so one kernel serves every row count. `run` builds random packed weights and scales,
checks every kernel at every row count against a float32 torch product with the same
dequantized (float16-rounded) weights, reports the max error relative to the largest reference
value, and only then times it: `CALLS` back-to-back calls replayed as one CUDA graph, cycling
through weight copies that together exceed the 50 MB L2 (as the layers of a prefill do), CUDA
events around each replay, median of `REPEATS` replays, TFLOP/s = 2 M N K / time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us

# tile name -> TileConfig(bm, bn, warps_m, stages, ahead[, split_dequant])
TILES = {
    "128x128_w64x32_s4": (128, 128, 2, 4, 2),
    "128x128_w32x64_s4": (128, 128, 4, 4, 2),
    "128x128_w64x32_s3": (128, 128, 2, 3, 2),
    "128x64_w32x32_s4": (128, 64, 4, 4, 2),
    "64x128_w32x32_s4": (64, 128, 2, 4, 2),
    "64x64_w32x16_s4": (64, 64, 2, 4, 2),  # more blocks for the 4096-feature weights
    # weight lead: words loaded 1 / 3 K steps before their dequantization instead of 2
    "128x128_w64x32_s4_a1": (128, 128, 2, 4, 1),
    "128x128_w64x32_s4_a3": (128, 128, 2, 4, 3),
    # dequantization between the two k16 halves, the first half's mma already issued
    "128x128_w64x32_s4_split": (128, 128, 2, 4, 2, True),
    "128x64_w32x32_s4_split": (128, 64, 4, 4, 2, True),
}
MAIN_TILES = tuple(TILES)[:6]
F16_TILES = ("128x128_w64x32_s3", "128x64_w32x32_s4", "64x128_w32x32_s4",
             "64x64_w32x16_s4")
# (case, N, K, weights "q4"/"f16", y dtype, bias, row counts, tiles)
CASES = [
    ("qkv", 12288, 4096, "q4", "float16", False, (100, 512, 2048), tuple(TILES)),
    ("o_proj", 4096, 4096, "q4", "float16", False, (512,), MAIN_TILES),
    ("gate_up", 22016, 4096, "q4", "float16", False, (512,), tuple(TILES)),
    ("down", 4096, 11008, "q4", "float16", False, (512,), MAIN_TILES),
    ("o_proj_f16w", 4096, 4096, "f16", "float16", False, (512,), F16_TILES),
    ("logits_f32", 32000, 4096, "q4", "float32", False, (512,), ("128x128_w64x32_s4",)),
    # tails: rows and features not multiples of any tile, odd N (unpaired stores), bias
    ("tail_bias", 1001, 512, "q4", "float16", True, (77,),
     ("128x128_w64x32_s4", "128x64_w32x32_s4", "128x128_w64x32_s4_a3",
      "128x128_w64x32_s4_split")),
    ("tail_f16w_bias", 4000, 1024, "f16", "float32", True, (130,), ("128x64_w32x32_s4",)),
]
CALLS, REPEATS, L2_BYTES = 20, 7, 120_000_000


def spec_for(n: int, k: int, weights: str, ydt: str, bias: bool):
    from mlcc.backends.plan import KernelSpec
    from mlcc.ir.types import Sym

    rows = Sym("seq_len")
    if weights == "q4":
        ins = [((rows, k), "float16"), ((n, k // 8), "uint32"), ((n, k // 32), "float16")]
        attrs = (("bits", 4), ("group_size", 32), ("in_features", k))
    else:
        ins, attrs = [((rows, k), "float16"), ((n, k), "float16")], ()
    if bias:
        ins.append(((n,), "float16"))
    return KernelSpec("q_linear" if weights == "q4" else "linear", tuple(ins),
                      (((rows, n), ydt),), attrs)


def variants() -> list[dict]:
    out = []
    for case, n, k, weights, ydt, bias, rows, tiles in CASES:
        for tile in ("wmma",) + tiles:
            out.append({"case": case, "n": n, "k": k, "weights": weights, "y": ydt,
                        "bias": bias, "rows": list(rows), "tile": tile,
                        "name": f"{case}_{tile}"})
    return out


def build(folder: Path) -> None:
    from mlcc.backends.cuda.codegen import compile_library
    from mlcc.backends.cuda.gemm import TileConfig, gemm_tc_kernel
    from mlcc.backends.cuda.linear import LinearShape, gemm_wmma_rule

    kernels = []
    for v in variants():
        spec = spec_for(v["n"], v["k"], v["weights"], v["y"], v["bias"])
        if v["tile"] == "wmma":
            kernels.append(gemm_wmma_rule(spec, v["name"]))
        else:
            config = TileConfig(*TILES[v["tile"]])
            kernels.append(gemm_tc_kernel(LinearShape(spec), v["name"], config))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    compile_library(kernels, "", "", folder / "gemm_bench.so")
    (folder / "variants.json").write_text(json.dumps(variants(), indent=1))
    print(f"built {len(kernels)} kernels in {time.perf_counter() - start:.1f} s")


def case_data(rng, v: dict, copies: int) -> list[dict]:
    """`copies` independent weight sets (numpy), each with its float32 dequantized weight."""
    n, k = v["n"], v["k"]
    out = []
    for _ in range(copies):
        if v["weights"] == "q4":
            qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
            qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
            arrays = [qw, qs]
        else:
            arrays = [(rng.standard_normal((n, k)) * 0.05).astype(np.float16)]
        if v["bias"]:
            arrays.append(rng.standard_normal(n).astype(np.float16))
        out.append({"arrays": arrays})
    return out


def dequantized(torch, arrays: list[np.ndarray], weights: str, device: str = "cuda"):
    """float32 weights on `device`: float16((code - 7) * scale), the reference's rounding."""
    if weights != "q4":
        return torch.from_numpy(arrays[0]).to(device).float()
    qw = torch.from_numpy(arrays[0].view(np.int32)).to(device)
    shifts = torch.arange(0, 32, 4, device=device, dtype=torch.int32)
    codes = ((qw[:, :, None] >> shifts) & 15).reshape(qw.shape[0], -1).float()
    scales = torch.from_numpy(arrays[1]).to(device).float().repeat_interleave(32, dim=1)
    return ((codes - 7.0) * scales).half().float()


def run(folder: Path, out: Path) -> None:
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    dev = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / "gemm_bench.so"))
    rng = np.random.default_rng(0)
    results = []
    for case, n, k, weights, ydt, bias, rows, _ in CASES:
        group = [v for v in variants() if v["case"] == case]
        nbytes = n * k // 2 + n * k // 16 if weights == "q4" else n * k * 2
        data = case_data(rng, group[0], max(2, -(-L2_BYTES // nbytes)))
        for d in data:
            d["dev"] = [tvm.runtime.tensor(a, dev) for a in d["arrays"]]
        w_ref = dequantized(torch, data[0]["arrays"], weights)
        b_ref = torch.from_numpy(data[0]["arrays"][-1]).cuda().float() if bias else None
        for m in rows:
            x = rng.standard_normal((m, k)).astype(np.float16)
            x_dev, y_dev = tvm.runtime.tensor(x, dev), tvm.runtime.empty((m, n), ydt, dev)
            expected = torch.from_numpy(x).cuda().float() @ w_ref.T
            if b_ref is not None:
                expected += b_ref
            for v in group:
                results.append(measure(torch, lib[v["name"]], v, m, x_dev, y_dev, data,
                                       expected))
        del data
    doc = {"device": torch.cuda.get_device_name(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python " + " ".join(sys.argv), "calls": CALLS, "repeats": REPEATS,
           "best": best_tiles(results), "variants": results}
    out.write_text(json.dumps(doc, indent=1))


def measure(torch, f, v: dict, m: int, x_dev, y_dev, data: list[dict], expected) -> dict:
    f(x_dev, *data[0]["dev"], y_dev)
    got = torch.from_numpy(y_dev.numpy().astype(np.float32)).to(expected.device)
    err = float((got - expected).abs().max() / expected.abs().max())
    row = {k: v[k] for k in ("case", "tile", "name", "n", "k", "weights", "y", "bias")}
    row.update(m=m, rel_err=err)
    if err < 5e-3:
        row["us"] = time_variant(torch, f, x_dev, data, y_dev)
        row["tflops"] = 2.0 * m * v["n"] * v["k"] / (row["us"] * 1e-6) / 1e12
    print(f"{v['name']:34s} M={m:5d} err {err:.1e} " +
          (f"{row['us']:9.2f} us {row['tflops']:6.1f} TFLOP/s" if "us" in row else "FAILED"),
          flush=True)
    return row


def time_variant(torch, f, x_dev, data: list[dict], y_dev) -> float:
    """Median time per call of CALLS calls replayed as one CUDA graph, cycling weight copies."""
    return replay_us(torch, lambda i: f(x_dev, *data[i % len(data)]["dev"], y_dev), CALLS,
                     warm=len(data), repeats=REPEATS)

def best_tiles(results: list[dict]) -> dict:
    """Fastest validated kernel per (case, rows), with the WMMA baseline beside it."""
    best: dict[str, dict] = {}
    for r in results:
        if "us" not in r:
            continue
        key = f"{r['case']},M={r['m']}"
        entry = best.setdefault(key, {})
        if r["tile"] == "wmma":
            entry["wmma_tflops"] = r["tflops"]
        elif "tflops" not in entry or r["tflops"] > entry["tflops"]:
            entry.update(tile=r["tile"], us=r["us"], tflops=r["tflops"])
    return best


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
