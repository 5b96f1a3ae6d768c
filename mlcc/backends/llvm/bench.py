"""Validate-then-benchmark harness for the CPU linear kernels (never asserts speed).

    python -m mlcc.backends.llvm.bench --k 4096 --n 11008 --rows 1 --quant 4 --dtype float16
    python -m mlcc.backends.llvm.bench --k 4096 --n 4096 --rows 128 --rule gemm --rule fallback

Each schedule rule that applies is built, checked against NumPy on random data (the run stops
at the first mismatch), then timed with TVM's time_evaluator: best of `--repeat` runs, each the
mean of `--number` calls. The report gives microseconds, the weight bytes read per second and
the arithmetic rate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlcc.backends.layouts import GroupQuantLayout

RULE_NAMES = ("gemv_bytes", "gemv", "gemm", "fallback")


def _weights(spec, rng):
    """Arguments for the weight and a float32 reference of W [N, K]."""
    w = rng.standard_normal((spec.out_features, spec.in_features)).astype(np.float32)
    q = spec.quant
    if q is None:
        w = w.astype(spec.weight_dtype)
        return [w], w.astype(np.float32)
    padded = np.zeros((w.shape[0], q.k_pad), np.float32)
    padded[:, :q.k] = w
    groups = padded.reshape(w.shape[0], q.num_groups, q.group_size)
    scale = (np.abs(groups).max(-1) / q.max_int + 1e-8).astype(spec.weight_dtype)
    codes = np.clip(np.round(groups / scale.astype(np.float32)[..., None]) + q.max_int, 0,
                    2 * q.max_int).astype(np.uint64).reshape(w.shape[0], q.num_words, q.per_word)
    packed = (codes << (np.arange(q.per_word, dtype=np.uint64) * q.bits)).sum(-1)
    deq = (codes.reshape(w.shape[0], -1).astype(np.float32) - q.max_int) * np.repeat(
        scale.astype(np.float32), q.group_size, axis=1)
    return [packed.astype(np.uint32), scale], deq[:, :q.k]


def run_case(rule_name: str, rows: int, k: int, n: int, dtype: str, bits: int | None,
             group: int, number: int, repeat: int) -> dict | None:
    """Build, validate and time one rule; None when the rule does not apply."""
    import tvm

    from mlcc.backends.build import make_target
    from mlcc.backends.llvm import linear as L

    quant = GroupQuantLayout(bits, group, k) if bits else None
    spec = L.LinearSpec(1 if rows == 1 else "seq_len", k, n, dtype, dtype, quant)
    rule = {"gemv_bytes": L.gemv_bytes_rule, "gemv": L.gemv_rule, "gemm": L.gemm_rule,
            "fallback": L.linear_fallback}[rule_name]
    func = rule(spec)
    if func is None:
        return None
    start = time.perf_counter()
    ex = tvm.compile(L.finish(func, "bench_linear"), target=make_target("cpu"))
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    w_args, w_ref = _weights(spec, rng)
    x = rng.standard_normal((rows, k)).astype(dtype)
    args = [tvm.runtime.tensor(a) for a in [x, *w_args, np.zeros((rows, n), dtype)]]
    ex["bench_linear"](*args)
    expected = x.astype(np.float32) @ w_ref.T
    tol = 1e-3 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(args[-1].numpy().astype(np.float32), expected, rtol=tol,
                               atol=tol * float(np.abs(expected).max()))
    timer = ex.mod.time_evaluator("bench_linear", tvm.cpu(0), number=number, repeat=repeat)
    seconds = min(timer(*args).results)
    weight_bytes = sum(a.nbytes for a in w_args)
    return {"rule": rule_name, "rows": rows, "k": k, "n": n, "dtype": dtype,
            "quant": f"q{bits}g{group}" if bits else "float", "us": seconds * 1e6,
            "GB/s": weight_bytes / seconds / 1e9, "GFLOP/s": 2 * rows * k * n / seconds / 1e9,
            "build_s": build_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--quant", type=int, default=4, help="bits (3, 4, 8); 0 = float")
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--rule", action="append", choices=RULE_NAMES)
    parser.add_argument("--number", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    for rule in args.rule or list(RULE_NAMES):
        report = run_case(rule, args.rows, args.k, args.n, args.dtype, args.quant or None,
                          args.group, args.number, args.repeat)
        if report is not None:
            print("  ".join(f"{key}={value:.1f}" if isinstance(value, float) else
                            f"{key}={value}" for key, value in report.items()), flush=True)


if __name__ == "__main__":
    main()
