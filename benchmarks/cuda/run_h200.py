"""End-to-end decode/prefill benchmark of a CUDA library on one GPU, with HF transformers as peer.

Runs on the GPU machine (TVM runtime only; the library was compiled on the build machine from
the `llama2_7b` preset, e.g. `mlcc compile llama2_7b --quantization q4f16_1 --device cuda -o
lib.so`). Steps, all in one process:

1. a Llama-2-7B-shaped random HF checkpoint (fp16, hidden 4096, intermediate 11008, 32 layers,
   32 heads, vocab 32000) made with transformers on the GPU and saved as safetensors;
2. the peer: HF transformers fp16 (eager) on the same weights: decode of 128 tokens after a
   32-token prompt, and one 512-token prefill;
3. `convert_weight` q4f16_1 on the GPU, then the library: the same decode (greedy, through
   engine.decode_greedy: with the graph the GPU runs a step ahead of the host; also timed with
   the host reading each token before the next step) and prefill, with and without the CUDA
   graph, and decode of 64 tokens after 960 and after 3,968 with the graph;
   peak GPU memory;
   with max_batch_size=16 in the library, batch decode of all 16 sequences (128 steps);
4. a per-kernel time breakdown of one decode step (torch profiler, CUPTI) with the achieved
   bandwidth of each weight-streaming kernel, from the kernel shapes in the library metadata.

    python benchmarks/cuda/run_h200.py --lib lib.so --work /tmp/bench --out RESULTS_DIR

Writes RESULTS_DIR/decode_bench.json and decode_bench.md. It measures; it never asserts speed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.kernels import kernel_breakdown, weight_bytes_per_token
from benchmarks.measure import measure_batch_decode

HF_CONFIG = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
             "tie_word_embeddings": False}
PROMPT, DECODE, PREFILL = 32, 128, 512
# decode at a long context too (CUDA graph only): LONG_DECODE tokens after LONG_PROMPT, which
# ends within the preset's 4,096-token context window
LONG_PROMPT, LONG_DECODE = 3968, 64
FINGERPRINT = 32  # untimed greedy tokens whose logits are compared across libraries
MID_PROMPT = 960  # a mid-length context: decode of LONG_DECODE tokens after it
HBM_BYTES_PER_S = 4.24e12  # design.md section 7, measured read bandwidth of the H200


def make_checkpoint(folder: Path, layers: int):
    import torch
    import transformers

    config = transformers.LlamaConfig(**{**HF_CONFIG, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.float16).eval()
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder, safe_serialization=True)
    return model


def time_cuda(fn) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def peer_numbers(model) -> dict:
    """HF transformers fp16 eager: tok/s of decode after a prompt and of one long prefill."""
    import torch

    ids = torch.randint(0, HF_CONFIG["vocab_size"], (1, PREFILL), device="cuda")
    with torch.no_grad():
        model(ids[:, :PROMPT])  # warm-up
        prefill = min(time_cuda(lambda: model(ids)) for _ in range(3))

        def decode():
            out = model(ids[:, :PROMPT], use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(DECODE):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        decode()
        decode_s = time_cuda(decode) - time_cuda(lambda: model(ids[:, :PROMPT]))
    return {"peer_decode_tok_s": DECODE / decode_s, "peer_prefill_tok_s": PREFILL / prefill}


def engine_numbers(engine, cudagraph: bool) -> dict:
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, HF_CONFIG["vocab_size"], PROMPT).tolist()
    engine.cudagraph = cudagraph
    engine._graphs.clear()
    engine._greedy.clear()

    def decode_run(prompt: list[int], steps: int) -> float:
        # greedy through engine.decode_greedy: with the graph the GPU runs a step ahead of the
        # host (one int32 back per step, read while the next step runs)
        engine.reset()
        first = engine.append(prompt, on_device=True).argmax()
        start = time.perf_counter()
        engine.decode_greedy(first, steps)
        return time.perf_counter() - start

    def host_loop_run(prompt: list[int], steps: int) -> float:
        # the host picks up each step's token (argmax on the GPU) before it starts the next
        engine.reset()
        logits = engine.append(prompt, on_device=True)
        start = time.perf_counter()
        for _ in range(steps):
            logits = engine.decode(logits.argmax(), on_device=True)
        return time.perf_counter() - start

    decode_run(prompt, DECODE)
    decode_s = min(decode_run(prompt, DECODE) for _ in range(2))
    host_loop_s = min(host_loop_run(prompt, DECODE) for _ in range(2))
    long_prompt = rng.integers(0, HF_CONFIG["vocab_size"], PREFILL).tolist()
    engine.prefill_logits(long_prompt)
    prefill_s = min(_timed(lambda: engine.prefill_logits(long_prompt)) for _ in range(3))
    numbers = {"decode_tok_s": DECODE / decode_s, "prefill_tok_s": PREFILL / prefill_s,
               "decode_host_loop_tok_s": DECODE / host_loop_s}
    numbers.update(fingerprint(engine, prompt))
    # the pipelined greedy loop must pick the tokens the plain loop picks
    numbers["greedy_loop_tokens_equal"] = (
        engine.generate_greedy(prompt, FINGERPRINT) == numbers["greedy_tokens"])
    if cudagraph:
        for key, length in (("decode_mid_tok_s", MID_PROMPT), ("decode_long_tok_s", LONG_PROMPT)):
            far = rng.integers(0, HF_CONFIG["vocab_size"], length).tolist()
            decode_run(far, LONG_DECODE)
            numbers[key] = LONG_DECODE / min(decode_run(far, LONG_DECODE) for _ in range(2))
    return numbers


def fingerprint(engine, prompt: list[int]) -> dict:
    """What two libraries of the same arithmetic must agree on exactly: FINGERPRINT greedy
    tokens after the prompt and the md5 of the last logits row (float32 bytes)."""
    engine.reset()
    logits = engine.append(prompt)
    tokens = []
    for _ in range(FINGERPRINT):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decode(tokens[-1])
    row = np.ascontiguousarray(np.asarray(logits, dtype=np.float32))
    return {"greedy_tokens": tokens, "final_logits_md5": hashlib.md5(row.tobytes()).hexdigest()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_library(args, params: Path) -> dict:
    import torch

    from mlcc.runtime_check.compiled import CompiledEngine

    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info()
    engine = CompiledEngine(args.lib, params, device="cuda")
    results = {}
    for graph in (False, True):
        numbers = engine_numbers(engine, graph)
        suffix = "_cudagraph" if graph else "_no_graph"
        results.update({k + suffix: v for k, v in numbers.items()})
    free_after, _ = torch.cuda.mem_get_info()
    results["peak_gpu_mem_gb"] = (free_before - free_after) / 1e9
    # every sequence the library holds (compiled with max_batch_size=16) decoding together
    prompt = np.random.default_rng(1).integers(0, HF_CONFIG["vocab_size"], PROMPT).tolist()
    batch = measure_batch_decode(engine, prompt, DECODE, repeats=2, budget=60.0)
    if batch["available"]:
        results["batch_decode_sequences"] = batch["batch"]
        results[f"batch{batch['batch']}_decode_tok_s"] = batch["tokens_per_second"]["median"]
    results["kernels"] = kernel_breakdown(engine, list(range(1, PROMPT + 1)))
    results["prefill_kernels"] = kernel_breakdown(engine, list(range(1, PREFILL + 1)), "prefill",
                                                steps=2)
    results["weight_bytes_per_token"] = weight_bytes_per_token(engine.metadata)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()
    import torch

    from mlcc.interface.convert_weight import convert_weight

    args.out.mkdir(parents=True, exist_ok=True)
    hf, params = args.work / "hf", args.work / "params"
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
             "python": platform.python_version(), "command": " ".join(sys.argv)}
    start = time.perf_counter()
    peer = {}
    # a second library in the same work folder reuses the checkpoint (and its conversion)
    if not (args.skip_peer and (hf / "config.json").is_file()):
        model = make_checkpoint(hf, args.layers)
        peer = {} if args.skip_peer else peer_numbers(model)
        del model
    stamp["checkpoint_s"] = time.perf_counter() - start
    torch.cuda.empty_cache()
    start = time.perf_counter()
    if not (params / "ndarray-cache.json").is_file():
        convert_weight(hf, "q4f16_1", params, device="cuda", progress=False)
    stamp["convert_weight_s"] = time.perf_counter() - start
    results = {**stamp, **peer, **run_library(args, params)}
    best = max(results["decode_tok_s_cudagraph"], results["decode_tok_s_no_graph"])
    results["decode_tok_s"] = best
    results["prefill_tok_s"] = results["prefill_tok_s_no_graph"]
    roofline = HBM_BYTES_PER_S / results["weight_bytes_per_token"]
    results["roofline_tok_s"] = roofline
    results["roofline_fraction"] = best / roofline
    (args.out / "decode_bench.json").write_text(json.dumps(results, indent=1))
    (args.out / "decode_bench.md").write_text(report(results))
    print(report(results))


def long_rows(r: dict) -> list[str]:
    """The mid- and long-context decode lines of the report (absent from older runs)."""
    return [f"| decode tok/s ({LONG_DECODE} after {length:,}), CUDA graph | "
            f"{r[key + '_cudagraph']:.1f} | |"
            for key, length in (("decode_mid_tok_s", MID_PROMPT),
                                ("decode_long_tok_s", LONG_PROMPT))
            if key + "_cudagraph" in r]


def batch_rows(r: dict) -> list[str]:
    """The batch decode line of the report, when the library had a batch_decode entry."""
    if "batch_decode_sequences" not in r:
        return []
    n = r["batch_decode_sequences"]
    return [f"| batch-{n} decode tok/s (all sequences) | {r[f'batch{n}_decode_tok_s']:.0f} | |"]


def host_loop_rows(r: dict) -> list[str]:
    """Decode with the graph when the host reads each token before starting the next step, and
    whether the pipelined loop (the decode figure above it) picked the same tokens."""
    if "decode_host_loop_tok_s_cudagraph" not in r:
        return []
    same = "same tokens" if r.get("greedy_loop_tokens_equal_cudagraph") else "TOKENS DIFFER"
    row = (f"| decode tok/s (128 after 32), CUDA graph, host loop per token | "
           f"{r['decode_host_loop_tok_s_cudagraph']:.1f} ({same}) | |")
    return [row]


def fingerprint_rows(r: dict) -> list[str]:
    if "final_logits_md5_cudagraph" not in r:
        return []
    graph, plain = r["final_logits_md5_cudagraph"][:8], r["final_logits_md5_no_graph"][:8]
    row = f"| logits md5 after {FINGERPRINT} greedy tokens, graph / no graph | {graph} / {plain} | |"
    return [row]


def report(r: dict) -> str:
    lines = [f"# CUDA decode/prefill, Llama-2-7B shape, q4f16_1, batch 1 ({r['date']})", "",
             f"GPU: {r['gpu']}; torch {r['torch']}; python {r['python']}",
             f"Command: `{r['command']}`", "",
             "| metric | mlcc | HF transformers fp16 (peer) |", "|---|---|---|",
             (f"| decode tok/s (128 after 32), CUDA graph | {r['decode_tok_s_cudagraph']:.1f} | "
              f"{r.get('peer_decode_tok_s', float('nan')):.1f} |"),
             *host_loop_rows(r),
             f"| decode tok/s, no graph | {r['decode_tok_s_no_graph']:.1f} | |",
             *long_rows(r),
             (f"| prefill(512) tok/s | {r['prefill_tok_s']:.0f} | "
              f"{r.get('peer_prefill_tok_s', float('nan')):.0f} |"),
             f"| peak GPU memory GB | {r['peak_gpu_mem_gb']:.2f} | |",
             *batch_rows(r),
             (f"| roofline fraction (decode / {r['roofline_tok_s']:.0f} tok/s) | "
              f"{r['roofline_fraction']:.1%} | |"),
             *fingerprint_rows(r), "",
             "## One decode step, per kernel (no graph)", "",
             "| kernel | op | calls | us/step | GB/s |", "|---|---|---|---|---|"]
    for k in r["kernels"]:
        gbs = f"{k['gb_s']:.0f}" if "gb_s" in k else ""
        lines.append(f"| {k['kernel'][:48]} | {k.get('op', '')} | {k['calls']} | "
                     f"{k['us']:.1f} | {gbs} |")
    total = sum(k["us"] for k in r["kernels"])
    gemv = [k for k in r["kernels"] if k.get("op") == "q_linear" and "bytes_per_call" in k]
    moved = sum(k["bytes_per_call"] * k["calls"] for k in gemv)
    gemv_us = sum(k["us"] for k in gemv)
    lines += ["", (f"Kernel time per step: {total / 1000:.3f} ms "
                   f"({1e6 / total:.0f} tok/s if launches were free); all q_linear GEMVs: "
                   f"{gemv_us / 1000:.3f} ms at {moved / gemv_us / 1e3:.0f} GB/s. A kernel's "
                   "time is what it adds to the stream: from its start or the end of the "
                   "kernel ahead, whichever is later (benchmarks/kernels.py)."), "",
              f"## One {PREFILL}-token prefill, per kernel", "",
              "| kernel | op | calls | us |", "|---|---|---|---|"]
    for k in r["prefill_kernels"][:12]:
        lines.append(f"| {k['kernel'][:48]} | {k.get('op', '')} | {k['calls']} | "
                     f"{k['us']:.0f} |")
    prefill_total = sum(k["us"] for k in r["prefill_kernels"])
    lines += ["", f"Kernel time per prefill: {prefill_total / 1000:.2f} ms."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
