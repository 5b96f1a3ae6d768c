"""Peak memory of `mlcc convert_weight` on a random, Llama-shaped, 4-shard safetensors checkpoint.

The checkpoint is built in a temporary folder from the frontend's own weight mapping (float16,
HF names, model-0000K-of-00004.safetensors + index), then converted by `python -m mlcc.cli` in
a child process whose peak RSS comes from wait4(). The figure to hold is about two source
shards plus 300 MB (Python, torch and the libraries take ~220 MB of that before any work).

    python benchmarks/convert_memory.py                        # ~1 GB checkpoint, q4f16_1
    python benchmarks/convert_memory.py --shape 100mb --json   # what the slow test runs
    python benchmarks/convert_memory.py --write benchmarks/results/convert_memory.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mlcc.frontend import resolve_model

MB = 1_000_000
ALLOWANCE = 300 * MB
SHAPES = {
    # ~491M parameters, 0.98 GB in float16
    "1gb": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
            "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000},
    # ~59M parameters, 0.12 GB in float16; a small vocabulary keeps every tensor far below a
    # shard, so loading the whole checkpoint at once would show clearly in the peak.
    "100mb": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 18,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 8000},
}


def llama_config(shape: str) -> dict:
    """An HF config.json for a float16 LlamaForCausalLM of the named shape, untied."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}


def build_checkpoint(folder: Path, hf_config: dict, shards: int = 4, seed: int = 0) -> list[int]:
    """Write config.json, the shards and their index; returns the bytes of each shard."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    model = resolve_model(folder)
    tensors = [(hf, shape) for p in model.arch.weight_mapping(model.config).params
               for hf, shape in zip(p.hf_names, p.hf_shapes)]
    total = sum(math.prod(shape) * 2 for _, shape in tensors)
    assignment: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    done = 0
    for name, shape in tensors:  # in load order; a tensor goes where its middle byte falls
        size = math.prod(shape) * 2
        assignment[min(shards - 1, (2 * done + size) * shards // (2 * total))].append((name, shape))
        done += size
    rng = np.random.default_rng(seed)
    weight_map, sizes = {}, []
    for k, members in enumerate(assignment):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        arrays = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
                  for name, shape in members}
        save_file(arrays, folder / file, metadata={"format": "pt"})
        sizes.append(sum(a.nbytes for a in arrays.values()))
        weight_map.update(dict.fromkeys(arrays, file))
        del arrays
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sizes


def peak_rss_of(command: list[str]) -> tuple[int, float, int, str]:
    """(peak RSS in bytes, seconds, exit status, stderr) of one child process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return usage.ru_maxrss * 1024, time.perf_counter() - started, child.returncode, text


def measure(shape: str, quantization: str, workdir: Path | None) -> dict:
    """Build, convert, and report the figures as a dict."""
    with tempfile.TemporaryDirectory(prefix="mlcc-convert-memory-", dir=workdir) as tmp:
        source, output = Path(tmp) / "hf", Path(tmp) / "params"
        # Built in a child: a forked child's ru_maxrss starts from its parent's RSS, so the
        # parent that measures must stay small.
        subprocess.run([sys.executable, __file__, "--build", str(source), "--shape", shape],
                       check=True)
        sizes = json.loads((source / "shard_sizes.json").read_text())
        # The import's own RSS varies by a few MB from process to process; the largest of
        # three keeps that spread out of what the conversion is said to add.
        baseline = max(peak_rss_of([sys.executable, "-c",
                                    "import mlcc.cli, mlcc.interface.convert_weight"])[0]
                       for _ in range(3))
        peak, seconds, status, stderr = peak_rss_of(
            [sys.executable, "-m", "mlcc.cli", "convert_weight", str(source), "--quantization",
             quantization, "-o", str(output)])
        if status != 0:
            raise SystemExit(f"convert_weight failed with status {status}: {stderr.strip()}")
        written = sum(p.stat().st_size for p in output.glob("params_shard_*.bin"))
    bound = 2 * max(sizes) + ALLOWANCE
    return {"shape": shape, "quantization": quantization, "checkpoint_bytes": sum(sizes),
            "largest_shard_bytes": max(sizes), "output_bytes": written,
            "peak_rss_bytes": peak, "import_rss_bytes": baseline, "bound_bytes": bound,
            "within_bound": peak <= bound, "seconds": round(seconds, 1)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch "
            f"{importlib.metadata.version('torch')}")


def report(result: dict) -> str:
    """The Markdown section written to benchmarks/results/convert_memory.md."""
    def mb(n: int) -> str:
        return f"{n / MB:,.0f} MB"

    title = f"## {datetime.date.today().isoformat()}: {result['shape']} checkpoint"
    return "\n".join([
        f"{title}, {result['quantization']}",
        "",
        f"Machine: {machine()}.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| checkpoint (float16, 4 safetensors shards) | {mb(result['checkpoint_bytes'])} |",
        f"| largest source shard | {mb(result['largest_shard_bytes'])} |",
        f"| weights written | {mb(result['output_bytes'])} |",
        f"| peak RSS of the convert_weight process | {mb(result['peak_rss_bytes'])} |",
        f"| peak RSS of a process that only imports it | {mb(result['import_rss_bytes'])} |",
        f"| bound: 2 x largest shard + 300 MB | {mb(result['bound_bytes'])} |",
        f"| within bound | {'yes' if result['within_bound'] else 'NO'} |",
        f"| wall time of the conversion | {result['seconds']} s |",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1gb")
    parser.add_argument("--quantization", default="q4f16_1")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    parser.add_argument("--write", type=Path, default=None, help="append a Markdown section")
    parser.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build is not None:
        sizes = build_checkpoint(args.build, llama_config(args.shape))
        (args.build / "shard_sizes.json").write_text(json.dumps(sizes))
        return
    result = measure(args.shape, args.quantization, args.workdir)
    if args.json:
        print(json.dumps(result))
    else:
        print(report(result))
    if args.write is not None:
        with open(args.write, "a") as out:
            out.write(report(result) + "\n")


if __name__ == "__main__":
    main()
