"""Tensor parallelism on 2 and 4 H200s: the same greedy tokens as one GPU, and the speed.

Two steps, because the GPU machine has only the TVM runtime:

    python benchmarks/cuda/tp_run.py prepare            # here, where TVM compiles (minutes)
    GPUS=2 bash benchmarks/cuda/tp_run.sh               # there, with .device/site, .device/tp
    GPUS=4 bash benchmarks/cuda/tp_run.sh

`prepare` writes .device/site (runtime-only TVM, as prepare_device_run.py makes it, when it is
not there yet), .device/tp/cases (the tiny models of tests/gpu/test_tp_cuda.py) and
.device/tp/libs: the Llama-2-7B preset compiled for CUDA with q4f16_1 for 1 and 2 shards, and
the Llama-2-13B preset for 1 and 4 shards.

`run --gpus N` (on the GPU machine) makes a random Llama-2-shaped HF checkpoint with
transformers (7B for 2 GPUs, 13B for 4), converts it with `convert_weight` q4f16_1, then runs
the 1-shard library on one GPU and the N-shard library on N GPUs (one worker process per GPU,
NCCL all_reduce inside the decode CUDA graph) and records:
- 64 greedy tokens after a 32-token prompt on each: equal or not, and where they part;
- N GPUs fed one GPU's tokens (teacher forcing): largest logit difference, and whether the
  top token agrees at every step where one GPU's top two logits are more than 0.1 apart
  (random weights give near-ties, where fp16 rounding may pick either token);
- decode tok/s (64 tokens, CUDA graph on and off) and prefill tok/s (512-token prompt).
Results: OUT/tp_<model>_<N>gpu.json and .md. The checkpoint and params stay in --work, so a
second call skips making them (`--stage convert` stops there, to split a long run in two).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / ".device"
SHAPES = {
    "llama2_7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama2_13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                   "num_attention_heads": 40, "num_key_value_heads": 40},
}
COMMON = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
          "initializer_range": 0.02, "tie_word_embeddings": False}
MODEL_FOR_GPUS = {2: "llama2_7b", 4: "llama2_13b"}
PROMPT, GREEDY, PREFILL = 32, 64, 512
CLEAR_MARGIN = 0.1


def lib_name(model: str, shards: int) -> str:
    return f"{model}_q4f16_1_tp{shards}.so"


# --- prepare (build machine) ---------------------------------------------------------------


def prepare(args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks" / "cuda"))
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    sys.path.insert(0, str(ROOT / "tests" / "compile"))
    from prepare_device_run import runtime_site
    from tp_build import compile_sharded
    from tp_cases import build_cases

    from mlcc.frontend import resolve_model

    if not (DEVICE / "site" / "tvm").is_dir():
        runtime_site(args.python_tag)
    build_cases(args.out / "cases")
    for gpus, model in sorted(MODEL_FOR_GPUS.items()):
        source = resolve_model(model)
        for shards in (1, gpus):
            lib = args.out / "libs" / lib_name(model, shards)
            if lib.is_file():
                continue
            start = time.perf_counter()
            compile_sharded(source.arch, source.config, "q4f16_1", lib, shards, device="cuda")
            print(f"{lib.name}: compiled in {time.perf_counter() - start:.0f} s, "
                  f"{lib.stat().st_size / 1e6:.1f} MB")


# --- run (GPU machine) ---------------------------------------------------------------------


def make_checkpoint(folder: Path, model: str) -> None:
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return
    config = transformers.LlamaConfig(**COMMON, **SHAPES[model])
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(config).to(torch.float16).eval()
    hf.save_pretrained(folder, safe_serialization=True)
    del hf
    torch.cuda.empty_cache()


def convert(args, model: str) -> Path:
    from mlcc.interface.convert_weight import convert_weight

    hf, params = args.work / model / "hf", args.work / model / "params"
    start = time.perf_counter()
    make_checkpoint(hf, model)
    if not (params / "ndarray-cache.json").is_file():
        convert_weight(hf, "q4f16_1", params, device="cuda", progress=False)
    print(f"{model}: checkpoint and params ready in {time.perf_counter() - start:.0f} s")
    return params


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def speed(engine, prompt: list[int], long_prompt: list[int], set_graph) -> dict:
    """decode tok/s (greedy loop inside the engine, prefill subtracted) and prefill tok/s."""
    out = {}
    for graph in (True, False):
        set_graph(graph)
        engine.generate_greedy(prompt, 4)  # capture / warm up
        prefill_s = min(_timed(lambda: engine.prefill_logits(prompt))[0] for _ in range(2))
        total_s = min(_timed(lambda: engine.generate_greedy(prompt, GREEDY + 1))[0]
                      for _ in range(2))
        out["decode_tok_s" + ("_cudagraph" if graph else "_no_graph")] = \
            GREEDY / max(total_s - prefill_s, 1e-9)
    set_graph(True)
    engine.prefill_logits(long_prompt)
    out["prefill_tok_s"] = PREFILL / min(_timed(lambda: engine.prefill_logits(long_prompt))[0]
                                         for _ in range(3))
    return out


def gpu_memory() -> list[float]:
    import torch

    return [torch.cuda.mem_get_info(i)[0] / 1e9 for i in range(torch.cuda.device_count())]


def run_one_gpu(lib: Path, params: Path, prompt, long_prompt) -> dict:
    from mlcc.runtime_check.compiled import CompiledEngine

    free_before = gpu_memory()
    load_s, engine = _timed(lambda: CompiledEngine(lib, params, device="cuda"))
    logits = engine.prefill_logits(prompt)
    tokens, reference = [], []
    for _ in range(GREEDY):
        tokens.append(int(np.argmax(logits)))
        reference.append(logits)
        logits = engine.decode(tokens[-1])
    used = [b - a for b, a in zip(free_before, gpu_memory())]
    numbers = speed(engine, prompt, long_prompt,
                    lambda on: setattr(engine, "cudagraph", on))
    del engine
    gc.collect()
    return {"load_s": load_s, "tokens": tokens, "reference": reference, "gpu_mem_gb": used,
            **numbers}


def run_sharded(lib: Path, params: Path, shards: int, prompt, long_prompt, one: dict) -> dict:
    from mlcc.runtime_check.tensor_parallel import TensorParallelEngine

    free_before = gpu_memory()
    load_s, engine = _timed(lambda: TensorParallelEngine(lib, params, device="cuda",
                                                         shards=shards))
    with engine:
        used = [b - a for b, a in zip(free_before, gpu_memory())]
        tokens = engine.generate_greedy(prompt, GREEDY)
        forced = [engine.prefill_logits(prompt)] + [engine.decode(t) for t in one["tokens"][:-1]]
        numbers = speed(engine, prompt, long_prompt, engine.set_cudagraph)
    diffs, agree, clear = [], 0, 0
    for got, ref, token in zip(forced, one["reference"], one["tokens"]):
        diffs.append(float(np.abs(got - ref).max()))
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > CLEAR_MARGIN:
            clear += 1
            agree += int(np.argmax(got)) == token
    parted = next((i for i, (a, b) in enumerate(zip(tokens, one["tokens"])) if a != b), None)
    # up to `parted` both saw the same tokens, so one GPU's logits there are the forced ones
    margin = None if parted is None else float(np.diff(np.sort(one["reference"][parted])[-2:])[0])
    return {"load_s": load_s, "tokens": tokens, "gpu_mem_gb": used,
            "same_greedy_tokens": tokens == one["tokens"], "first_different_step": parted,
            "one_gpu_top2_margin_there": margin,
            "forced_max_logit_diff": max(diffs), "forced_clear_steps": clear,
            "forced_clear_steps_agreeing": agree, **numbers}


def bench(args, model: str, params: Path) -> dict:
    import torch

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, COMMON["vocab_size"], PROMPT).tolist()
    long_prompt = rng.integers(0, COMMON["vocab_size"], PREFILL).tolist()
    one = run_one_gpu(args.libs / lib_name(model, 1), params, prompt, long_prompt)
    torch.cuda.empty_cache()
    many = run_sharded(args.libs / lib_name(model, args.gpus), params, args.gpus, prompt,
                       long_prompt, one)
    one.pop("reference")
    return {"model": model, "quantization": "q4f16_1", "gpus": args.gpus,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv),
            "topology": _topology(), "one_gpu": one, f"{args.gpus}_gpus": many}


def _topology() -> str:
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi topo -m failed: {err}"


def report(r: dict) -> str:
    n, one, many = r["gpus"], r["one_gpu"], r[f"{r['gpus']}_gpus"]
    rows = [("decode tok/s, CUDA graph", "decode_tok_s_cudagraph", ".1f"),
            ("decode tok/s, no graph", "decode_tok_s_no_graph", ".1f"),
            (f"prefill({PREFILL}) tok/s", "prefill_tok_s", ".0f"),
            ("load s (engine start)", "load_s", ".1f")]
    lines = [f"# Tensor parallelism: {r['model']} shape, q4f16_1, 1 vs {n} GPUs ({r['date']})", "",
             f"GPU: {r['gpu']}; torch {r['torch']}; python {r['python']}",
             f"Command: `{r['command']}`", "", f"| metric | 1 GPU | {n} GPUs |", "|---|---|---|"]
    lines += [f"| {label} | {one[key]:{fmt}} | {many[key]:{fmt}} |" for label, key, fmt in rows]
    lines += [f"| GPU memory GB (per GPU) | {_mem(one)} | {_mem(many)} |", "",
              f"- {GREEDY} greedy tokens equal: {many['same_greedy_tokens']} "
              f"(first different step: {many['first_different_step']}, where one GPU's top "
              f"two logits are {many['one_gpu_top2_margin_there']} apart)",
              f"- teacher-forced: top token agrees at {many['forced_clear_steps_agreeing']} of "
              f"{many['forced_clear_steps']} steps with a clear top-2 margin (> {CLEAR_MARGIN});"
              f" largest logit difference {many['forced_max_logit_diff']:.4f}", "",
              "GPU topology (nvidia-smi topo -m):", "", "```", r["topology"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _mem(result: dict) -> str:
    return ", ".join(f"{g:.1f}" for g in result["gpu_mem_gb"] if g > 0.05) or "-"


def run(args) -> None:
    model = args.model or MODEL_FOR_GPUS[args.gpus]
    params = convert(args, model)
    if args.stage == "convert":
        return
    result = bench(args, model, params)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"tp_{model}_{args.gpus}gpu"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(report(result))
    print(report(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build machine: runtime site, cases, libraries")
    p.add_argument("--out", type=Path, default=DEVICE / "tp")
    p.add_argument("--python-tag", default="cp312")
    r = sub.add_parser("run", help="GPU machine: checkpoint, convert, 1 vs N GPUs")
    r.add_argument("--gpus", type=int, required=True, choices=sorted(MODEL_FOR_GPUS))
    r.add_argument("--model", choices=sorted(SHAPES))
    r.add_argument("--libs", type=Path, default=DEVICE / "tp" / "libs")
    r.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mlcc-tp")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--stage", choices=("all", "convert"), default="all")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
