"""Decode speed of several libraries of one model, interleaved round by round in one process.

    python benchmarks/ab_decode.py PARAMS LIB [LIB ...] [--rounds 12] [--steps 32] [--out F.md]
        [--device cuda] [--prompt 16] [--batch 16]

Every round resets each library's engine, prefills the same `--prompt`-token prompt (16 unless
given; longer ones time decode over a longer context) and times `steps` greedy-free decode
calls (the same token each step); a round's figure is the median step. The libraries take turns
inside every round, each round starting one library further along, so load that comes and goes
on a shared machine falls on all of them alike, which separate runs (`python -m benchmarks
run`) cannot promise: use this for a ratio between builds that differ by one knob. Prints (and
with --out writes) a markdown table: per library the median and mean over rounds, the range,
and the ratio of medians to the first library (a spread of rounds that is wide against that
ratio asks for more rounds or another call).
On a GPU (`--device cuda`) each library runs as its metadata says (the CUDA graph from O2) and
every step returns its logits row to the host, so a step's time is the GPU's plus one copy.
With `--batch N` (a library built with max_batch_size >= N) each round prefills the prompt into
N sequences and times `batch_decode` of all N together: the table's tok/s then counts N tokens
a step.

With `--pipelined` a round times `steps` greedy tokens through `decode_greedy` as one run
(the figure: its time over `steps`), the loop of benchmarks/cuda/run_h200.py: with the CUDA
graph the GPU runs a step ahead of the host and no step waits for the host. On an H200 its
rounds of the 7B decode agree within about 0.2%, and the step-by-step figures of one library
moved by about 3% from run to run (benchmarks/results/2026-11-30-h200-h): use it for ratios
of a few percent.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def prompt_ids(tokens: int) -> list[int]:
    return [1 + i % 30000 for i in range(tokens)]


def measure(params: Path, libs: list[Path], rounds: int, steps: int,
            device: str = "cpu", prompt: int = 16, batch: int = 1,
            pipelined: bool = False) -> dict[str, list[float]]:
    from mlcc.runtime_check.compiled import CompiledEngine

    engines = {str(lib): CompiledEngine(lib, params, device=device) for lib in libs}
    for name, engine in engines.items():
        if batch > 1 and ("batch_decode" not in engine.metadata["entries"]
                          or engine.max_sequences < batch):
            sys.exit(f"error: {name}: no batch_decode of {batch} sequences; build it with "
                     f"max_batch_size={batch}")
    rows: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)

    def greedy_run(engine) -> float:
        engine.reset()
        first = engine.append(prompt_ids(prompt), on_device=True).argmax()
        start = time.perf_counter()
        engine.decode_greedy(first, steps)
        return (time.perf_counter() - start) / steps

    if pipelined:
        for engine in engines.values():
            greedy_run(engine)  # unmeasured: the graph's capture and first replays
    for r in range(rounds):
        # each round starts with the next library, so none always runs first or after another
        for name in names[r % len(names):] + names[:r % len(names)]:
            engine = engines[name]
            if pipelined:
                rows[name].append(greedy_run(engine))
                continue
            for seq in range(batch):
                if batch > 1:
                    engine.select_sequence(seq)
                engine.reset()
                engine.prefill_logits(prompt_ids(prompt))
            if batch > 1:
                engine.select_sequence(0)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                if batch > 1:
                    engine.batch_decode([7] * batch)
                else:
                    engine.decode(7)
                times.append(time.perf_counter() - start)
            rows[name].append(float(np.median(times)))
    return rows


def table(rows: dict[str, list[float]], batch: int = 1) -> str:
    head = ("| library | decode ms a step (median of rounds) | mean | range | tok/s | "
            "ratio to first |")
    lines = [head, "|---|---|---|---|---|---|"]
    base = None
    for name, values in rows.items():
        ms = np.array(values) * 1e3
        median = float(np.median(ms))
        base = base or median
        lines.append(f"| {Path(name).name} | {median:.2f} | {ms.mean():.2f} | "
                     f"{ms.min():.2f}-{ms.max():.2f} | {batch * 1e3 / median:.1f} | "
                     f"{base / median:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", type=Path)
    parser.add_argument("libs", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens before decode")
    parser.add_argument("--batch", type=int, default=1,
                        help="sequences decoded together by batch_decode (1: decode)")
    parser.add_argument("--pipelined", action="store_true",
                        help="time greedy runs through decode_greedy (run_h200.py's loop)")
    args = parser.parse_args()
    if args.pipelined and args.batch > 1:
        sys.exit("error: --pipelined times one sequence; leave out --batch")
    for path in [args.params, *args.libs]:
        if not path.exists():
            sys.exit(f"error: {path}: not found; build the libraries and weights first")
    rows = measure(args.params, args.libs, args.rounds, args.steps, args.device, args.prompt,
                   args.batch, args.pipelined)
    text = table(rows, args.batch)
    print(text)
    if args.out:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        threads = os.environ.get("TVM_NUM_THREADS", f"all ({os.cpu_count()})")
        machine = platform.processor() or platform.machine()
        if args.device != "cpu":
            import torch

            machine = f"{torch.cuda.get_device_name()} (host {machine})"
        head = (f"- Date: {when}\n- Machine: {machine}, "
                f"{os.cpu_count()} cores; TVM threads: {threads}\n- Load average at the end: "
                f"{[round(v, 2) for v in os.getloadavg()]}\n- Command: `python "
                f"{shlex.join(sys.argv)}`\n- Rounds: {args.rounds}, {args.steps} decode steps "
                f"of {args.batch} sequence(s) each after a {args.prompt}-token prompt, libraries in turn within a round"
                f"{' (pipelined: decode_greedy runs)' if args.pipelined else ''}\n\n")
        args.out.write_text(head + text + "\n")


if __name__ == "__main__":
    main()
