"""`python -m benchmarks`: run a sweep, or redraw the table and plots of an earlier one.

    python -m benchmarks run                      # stories260K + random-llama-100m, O0..O3
    python -m benchmarks run --model stories260K --opt "O0,O2,O2;fuse_add_norm=0" --peer none
    python -m benchmarks report benchmarks/results/2026-11-28-cpu/results.json

A GPU machine without the TVM compiler measures libraries compiled elsewhere:

    python -m benchmarks build --model llama2_7b --device cuda --out prebuilt   # build machine
    python -m benchmarks run --model llama2_7b --device cuda --prebuilt prebuilt \
        --reference-steps 0                                                        # GPU machine
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks.spec import (
    DEFAULT_LEVELS,
    DEFAULT_MODELS,
    GPU_DEFAULT_PEERS,
    PEER_DTYPES,
    SweepSpec,
    is_cpu,
    parse_int_list,
    parse_list,
)
from mlcc.errors import MlccError

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="compile, gate and measure; write a results folder")
    add_sweep_options(run)
    run.add_argument("--prebuilt", type=Path, default=None,
                     help="use the libraries `python -m benchmarks build` wrote into this "
                     "folder instead of compiling (GPU machines without the TVM compiler)")
    run.add_argument("--out", type=Path, default=None,
                     help="results folder (default: benchmarks/results/<date>-<device>)")
    build = commands.add_parser("build", help="only compile every level (no weights needed) "
                                "into a folder that `run --prebuilt` reads")
    add_sweep_options(build)
    build.add_argument("--out", type=Path, required=True, help="folder for the libraries")
    report = commands.add_parser("report", help="rewrite README.md and plots from results.json")
    report.add_argument("results", type=Path)
    return parser


def add_sweep_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--model", action="append", help="stories260K, random-llama-100m, a "
                     f"preset or an HF folder; repeat for several (default: "
                     f"{', '.join(DEFAULT_MODELS)})")
    run.add_argument("--opt", default=",".join(DEFAULT_LEVELS),
                     help='comma-separated levels with knobs, e.g. "O0,O2,O2;fuse_add_norm=0"; '
                     "O0 is always built as the correctness baseline")
    run.add_argument("--quantization", default="q4f16_1")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--prompt-lengths", default="16,64,128",
                     help="prefill lengths, capped by the context window")
    run.add_argument("--decode-tokens", type=int, default=32, help="steps per decode run")
    run.add_argument("--gate-tokens", type=int, default=32, help="greedy tokens compared")
    run.add_argument("--reference-steps", type=int, default=8,
                     help="steps the IR interpreter checks (slow: seconds per step at 100M)")
    run.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    run.add_argument("--budget", type=float, default=30.0,
                     help="seconds after which a measurement stops repeating (>= 1 run)")
    run.add_argument("--threads", type=int, default=None, help="TVM and torch threads "
                     "(default: all cores)")
    run.add_argument("--peer", default=None,
                     help="transformers dtypes to run as the peer (on a GPU also "
                     "float16-compiled), or none (default: float32,bfloat16,float16 on the "
                     "CPU, float16,float16-compiled on a GPU)")
    run.add_argument("--max-batch-size", type=int, default=1,
                     help="compile with this many sequences and measure batch_decode too")
    run.add_argument("--child-timeout", type=float, default=1200.0,
                     help="seconds one measuring process may take")
    run.add_argument("--fresh", action="store_true",
                     help="compile every level even if the same library was built before")
    run.add_argument("--cache", type=Path, default=None,
                     help="random checkpoints and work files (default: $MLCC_BENCH_CACHE or "
                     "~/.cache/mlcc-benchmarks)")


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    if args.peer is None:
        peers = PEER_DTYPES if is_cpu(args.device) else GPU_DEFAULT_PEERS
    else:
        peers = () if args.peer.strip().lower() == "none" else parse_list(args.peer)
    extra = {"threads": args.threads} if args.threads else {}
    prebuilt = getattr(args, "prebuilt", None)
    if prebuilt is not None:
        extra["prebuilt"] = str(prebuilt)
    return SweepSpec(
        models=tuple(args.model or DEFAULT_MODELS), levels=parse_list(args.opt),
        quantization=args.quantization, device=args.device,
        prompt_lengths=parse_int_list(args.prompt_lengths, "--prompt-lengths"),
        decode_tokens=args.decode_tokens, gate_tokens=args.gate_tokens,
        reference_steps=args.reference_steps, repeats=args.repeats,
        budget_seconds=args.budget, peers=peers, max_batch_size=args.max_batch_size,
        child_timeout=args.child_timeout, reuse_libraries=not args.fresh, **extra)


def run_command(args: argparse.Namespace, argv: list[str]) -> Path:
    from benchmarks.machine import load_average, machine_info
    from benchmarks.models import cache_root
    from benchmarks.report import write_results
    from benchmarks.sweep import bench_model, log_to_stderr

    spec = spec_from_args(args)
    cache = args.cache or cache_root()
    machine = machine_info(gpu=spec.on_gpu)
    out = args.out or RESULTS / f"{time.strftime('%Y-%m-%d')}-{spec.device}"
    started = time.perf_counter()
    models = [bench_model(name, spec, cache, log_to_stderr) for name in spec.models]
    results = {"command": "python -m benchmarks " + shlex.join(argv), "spec": spec.to_json(),
               "machine": machine, "load_average_after": load_average(),
               "wall_seconds": time.perf_counter() - started, "models": models}
    write_results(results, out, log_to_stderr)
    return out


def build_command(args: argparse.Namespace) -> Path:
    from benchmarks.models import cache_root
    from benchmarks.sweep import build_model, log_to_stderr

    spec = spec_from_args(args)
    for name in spec.models:
        build_model(name, spec, args.cache or cache_root(), args.out, log_to_stderr)
    log_to_stderr(f"libraries in {args.out}; on the measuring machine: python -m benchmarks run "
                  f"--device {spec.device} --prebuilt {args.out} (same --model, --opt, "
                  "--quantization and --max-batch-size)")
    return args.out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            run_command(args, argv)
        elif args.command == "build":
            build_command(args)
        else:
            from benchmarks.report import write_results
            from benchmarks.sweep import log_to_stderr

            path = args.results
            write_results(json.loads(path.read_text()), path.parent, log_to_stderr)
    except MlccError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
