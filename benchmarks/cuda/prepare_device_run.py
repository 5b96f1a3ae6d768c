"""Everything the GPU machine needs that only the build machine can make, under .device/.

    python benchmarks/cuda/prepare_device_run.py [--python-tag cp312]

* .device/site: the TVM runtime without its compiler (the apache-tvm package minus
  libtvm_compiler.so, sources and compiler-only Python packages) plus apache-tvm-ffi 0.1.14.post1
  for the GPU machine's Python, unpacked (pip downloads the wheel);
* .device/cases: the parity-test models and CUDA libraries (tests/gpu/cuda_cases.py);
* .device/bench/llama2_7b_q4f16_1.so: the benchmark library, compiled from the llama2_7b preset
  (the compile time is printed);
* .device/sweep, .device/gemm, .device/attention, .device/elementwise: the kernel
  microbenchmarks (benchmarks/cuda/gemv_sweep.py, gemm_bench.py, attention_bench.py,
  elementwise_bench.py).

Then, on the GPU machine: `bash benchmarks/cuda/device_run.sh` with `.device/site`,
`.device/cases`, `.device/bench` and the microbenchmark folders carried.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / ".device"
COMPILER_ONLY = ("lib/libtvm_compiler.so", "lib/libtvm_runtime_extra.so", "3rdparty", "src",
                 "include", "relax", "topi", "web", "s_tir/meta_schedule", "s_tir/dlight",
                 "s_tir/tensor_intrin", "exec", "testing", "backend/hexagon", "backend/trn",
                 "backend/adreno", "contrib/hexagon")


def runtime_site(python_tag: str) -> None:
    import tvm

    site = DEVICE / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(Path(tvm.__file__).parent, site / "tvm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel in COMPILER_ONLY:
        path = site / "tvm" / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    wheels = DEVICE / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_tag[2:3] + "." + python_tag[3:],
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "-d",
                    str(wheels), "apache-tvm-ffi==0.1.14.post1"], check=True)
    wheel = next(wheels.glob(f"apache_tvm_ffi-0.1.14.post1-{python_tag}-*.whl"))
    zipfile.ZipFile(wheel).extractall(site)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-tag", default="cp312")
    args = parser.parse_args()
    runtime_site(args.python_tag)
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    from cuda_cases import build_cases

    from mlcc.interface.compile import compile_model

    build_cases(DEVICE / "cases")
    sys.path.insert(0, str(ROOT / "benchmarks" / "cuda"))
    from attention_bench import build as build_attention
    from elementwise_bench import build as build_elementwise
    from gemm_bench import build as build_gemm
    from gemv_sweep import build as build_sweep

    build_sweep(DEVICE / "sweep")
    build_gemm(DEVICE / "gemm")
    build_attention(DEVICE / "attention")
    build_elementwise(DEVICE / "elementwise")
    start = time.perf_counter()
    result = compile_model("llama2_7b", DEVICE / "bench" / "llama2_7b_q4f16_1.so",
                           quantization="q4f16_1", device="cuda")
    print(f"llama2_7b q4f16_1 compiled for CUDA in {time.perf_counter() - start:.1f} s: "
          f"{result.stage_seconds}")


if __name__ == "__main__":
    main()
