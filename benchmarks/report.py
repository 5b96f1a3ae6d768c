"""The results folder: results.json (every raw number), README.md (tables) and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from benchmarks.stats import Summary

MB = 1e6
# Figures measured outside this harness on the same model shape (design.md §7, CPU anchor).
ANCHORS = {
    "random-llama-100m": ("llama.cpp on this shape, this 2-core machine, 2026-11-28, 2 threads, "
                          "median of 5 (design.md §7): Q4_0 decode 309 tok/s, prefill(128) "
                          "1,344 tok/s; F16 decode 107 tok/s, prefill(128) 828 tok/s. mlcc's CPU "
                          "aim: q4f16_1 at least llama.cpp Q4_0's."),
}
# A 1-minute load average above this fraction of the cores means other work competed for them.
BUSY_LOAD_FRACTION = 0.5


def write_results(results: dict, out: Path, log: Callable[[str], None]) -> None:
    from benchmarks.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if results["spec"]["device"].startswith("cuda"):
        (out / "summary.json").write_text(json.dumps(gpu_summary(results), indent=1) + "\n")
    plots = write_plots(results, out)
    if not plots:
        log("plots skipped: matplotlib is not installed (pip install -e .[test])")
    (out / "README.md").write_text(render_markdown(results, plots))
    log(f"wrote {out}/README.md, results.json" + "".join(f", {p}" for p in plots))


# HBM read bandwidth of one H200 measured on 2026-11-28 (design.md section 7).
HBM_BYTES_PER_S = 4.24e12


def _median(data: dict | None) -> float | None:
    return Summary.from_json(data).median if data else None


def gpu_summary(results: dict) -> dict:
    """The headline figures of a GPU sweep per model and level (medians), in the key names
    the CUDA backend's benchmark uses: decode/prefill tok/s, batch decode, GPU memory, the
    peers' decode and the fraction of the HBM roofline that decode reaches."""
    out = {"date": results["machine"]["date"], "gpu": results["machine"].get("gpu"),
           "command": results["command"], "hbm_bytes_per_s": HBM_BYTES_PER_S, "models": {}}
    for model in results["models"]:
        longest = str(model["plan"]["lengths"][-1])
        peers = {f"peer_{name.replace('-', '_')}_decode_tok_s":
                 _median(p.get("decode", {}).get("tokens_per_second"))
                 for name, p in model["peers"].items()}
        levels = {}
        for level, entry in model["levels"].items():
            if not passed(entry):
                levels[level] = {"gate_passed": False}
                continue
            run = entry["run"]
            decode = _median(run["decode"]["tokens_per_second"])
            weights = run.get("kernels", {}).get("weight_bytes_per_token")
            batch = run.get("batch_decode", {})
            levels[level] = {
                "gate_passed": True, "decode_tok_s": decode,
                "prefill_tok_s": _median(run["prefill"][longest]["tokens_per_second"]),
                "prefill_tokens": int(longest),
                f"batch{batch.get('batch', '')}_decode_tok_s":
                    _median(batch.get("tokens_per_second")) if batch.get("available") else None,
                "peak_gpu_mem_gb": run.get("gpu_mem_bytes", 0) / 1e9,
                "roofline_fraction": decode * weights / HBM_BYTES_PER_S if weights else None,
                **peers}
        out["models"][model["name"]] = levels
    return out


def _summary(data: dict | None) -> Summary | None:
    return Summary.from_json(data) if data else None


def fmt_rate(data: dict | None, spread: bool = False) -> str:
    s = _summary(data)
    if s is None:
        return "—"
    text = f"{s.median:,.1f}" if s.median < 1000 else f"{s.median:,.0f}"
    if spread:
        text += f" ({s.low:,.1f}–{s.high:,.1f}, n={s.count})"
    return text


def gate_text(entry: dict) -> str:
    gate = entry.get("gate")
    if gate is None:
        return "—"
    return ("pass" if gate.get("passed") else "**FAIL**") + f": {gate.get('note', '')}"


def passed(entry: dict) -> bool:
    return bool(entry.get("gate", {}).get("passed")) and "error" not in entry.get("run", {})


def machine_lines(results: dict) -> list[str]:
    m = results["machine"]
    v = m["versions"]
    spec = results["spec"]
    memory = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else "unknown"
    lines = [
        f"- Date: {m['date']}; sweep wall time {results['wall_seconds'] / 60:.1f} min",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {memory} RAM, {m['os']}"
        + (f"; GPU: {m['gpu']}" if m.get("gpu") else ""),
        f"- Threads: {spec['threads']} (TVM runtime and torch)",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- mlcc commit: {m['git']}",
        f"- Command: `{results['command']}`",
    ]
    before, after = m.get("load_average"), results.get("load_average_after")
    if before:
        lines.append(f"- Load average (1, 5, 15 min) at the start: {before}; at the end: {after}")
        if max(before[0], (after or [0])[0]) > BUSY_LOAD_FRACTION * (m["cores"] or 1):
            lines.append("- **Other work ran on this machine during the sweep** (load above "
                         f"{BUSY_LOAD_FRACTION:g} per core): absolute numbers are lower and "
                         "noisier than on an idle machine; ratios taken side by side suffer less.")
    return lines


def throughput_table(model: dict) -> list[str]:
    lengths = model["plan"]["lengths"]
    head = ["runner", "gate", "decode tok/s (median, min–max, runs)",
            *[f"prefill tok/s @{n}" for n in lengths], f"TTFT ms @{lengths[-1]}",
            "peak RSS MB", "GPU memory GB", "host µs/token"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for level, entry in model["levels"].items():
        run = entry.get("run", {})
        error = entry["compile"].get("error") or run.get("error")
        if error:
            rows.append(f"| mlcc {level} | **FAIL**: {error} |" + " |" * (len(head) - 2))
            continue
        if not passed(entry):
            rows.append(f"| mlcc {level} | {gate_text(entry)} | not reported (gate failed) |"
                        + " |" * (len(head) - 3))
            continue
        host = run["host_overhead"]
        rows.append("| " + " | ".join([
            f"mlcc {level}", gate_text(entry), fmt_rate(run["decode"]["tokens_per_second"], True),
            *[fmt_rate(run["prefill"][str(n)]["tokens_per_second"]) for n in lengths],
            fmt_rate(run["prefill"][str(lengths[-1])]["ttft_ms"]),
            f"{run['rss']['peak_bytes'] / MB:,.0f}", _gpu_cell(run),
            _host_cell(host)]) + " |")
    for dtype, peer in model["peers"].items():
        if "error" in peer:
            rows.append(f"| transformers {dtype} | not run: {peer['error']} |"
                        + " |" * (len(head) - 2))
            continue
        rows.append("| " + " | ".join([
            f"transformers {dtype}", "(peer)", fmt_rate(peer["decode"]["tokens_per_second"], True),
            *[fmt_rate(peer["prefill"][str(n)]["tokens_per_second"]) for n in lengths],
            fmt_rate(peer["prefill"][str(lengths[-1])]["ttft_ms"]),
            f"{peer['rss']['peak_bytes'] / MB:,.0f}", _gpu_cell(peer), "—"]) + " |")
    return rows


def _gpu_cell(run: dict) -> str:
    return f"{run['gpu_mem_bytes'] / 1e9:.2f}" if run.get("gpu_mem_bytes") else "—"


def _host_cell(host: dict) -> str:
    if host.get("host_us") is None:
        return "—"
    return f"{host['host_us']:,.0f} ({host['host_percent']:.1f}%)"


def ratio_lines(model: dict) -> list[str]:
    """mlcc's levels over each peer that ran, decode and the longest prefill."""
    lines = []
    for name, peer in model["peers"].items():
        if "decode" in peer:
            lines += _ratios_to(model, name, peer)
    return lines


def _ratios_to(model: dict, name: str, peer: dict) -> list[str]:
    longest = str(model["plan"]["lengths"][-1])
    base_decode = Summary.from_json(peer["decode"]["tokens_per_second"]).median
    base_prefill = Summary.from_json(peer["prefill"][longest]["tokens_per_second"]).median
    lines = ["", f"Side by side with transformers {name} (decode; prefill @{longest}):", ""]
    for level, entry in model["levels"].items():
        if not passed(entry):
            continue
        run = entry["run"]
        decode = Summary.from_json(run["decode"]["tokens_per_second"]).median / base_decode
        prefill = Summary.from_json(run["prefill"][longest]["tokens_per_second"]).median
        lines.append(f"- mlcc {level}: decode {decode:.2f}x, prefill {prefill / base_prefill:.2f}x")
    return lines


def kernel_lines(model: dict, top: int = 8) -> list[str]:
    """Per level: decode step and prefill kernel totals, the q_linear GEMVs' bandwidth, and
    the slowest kernels of a decode step."""
    lines = []
    for level, entry in model["levels"].items():
        kernels = entry.get("run", {}).get("kernels")
        if not kernels or not passed(entry):
            continue
        decode, prefill = kernels["decode"], kernels["prefill"]
        step_us = sum(k["us"] for k in decode)
        gemv = [k for k in decode if k.get("op") == "q_linear" and "bytes_per_call" in k]
        gemv_us = sum(k["us"] for k in gemv)
        moved = sum(k["bytes_per_call"] * k["calls"] for k in gemv)
        bandwidth = f" at {moved / gemv_us / 1e3:,.0f} GB/s" if gemv_us else ""
        launches = sum(k["calls"] for k in decode)
        summary = (f"**{level}**: decode step {step_us / 1e3:.3f} ms of kernels ({launches} "
                   f"launches; q_linear {gemv_us / 1e3:.3f} ms{bandwidth}); prefill "
                   f"@{model['plan']['lengths'][-1]} {sum(k['us'] for k in prefill) / 1e3:.2f} "
                   "ms of kernels.")
        lines += [summary, "",
                  "| kernel | op | calls/step | µs/step | GB/s |", "|---|---|---|---|---|"]
        for k in decode[:top]:
            gbs = f"{k['gb_s']:,.0f}" if "gb_s" in k else ""
            lines.append(f"| {k['kernel'][:56]} | {k.get('op', '')} | {k['calls']} | "
                         f"{k['us']:,.1f} | {gbs} |")
        lines.append("")
    return lines


def gate_table(model: dict) -> list[str]:
    rows = ["| level | passed | max logit error | tolerance | leading tokens equal | note |",
            "|---|---|---|---|---|---|"]
    for level, entry in model["levels"].items():
        g = entry.get("gate", {})
        if "max_error" not in g:
            rows.append(f"| {level} | no | | | | {g.get('note', '')} |")
            continue
        rows.append(f"| {level} | {'yes' if g['passed'] else 'no'} | {g['max_error']:.3g} | "
                    f"{g['tolerance']:.3g} | {g['matching_tokens']}/{g['total_tokens']} | "
                    f"{g['note']} |")
    return rows


def host_table(model: dict) -> list[str]:
    rows = [("| level | decode step µs | direct entry call µs | host µs: decode with a no-op entry "
             "(% of step) | of which argument passing µs | empty FFI call µs |"),
            "|---|---|---|---|---|---|"]
    for level, entry in model["levels"].items():
        host = entry.get("run", {}).get("host_overhead")
        if not host or not passed(entry):
            continue
        if host["host_us"] is None:
            rows.append(f"| {level} | {host['decode_step_us']:,.0f} | "
                        f"{host['direct_entry_us']:,.0f} | not measured (no TVM compiler) | | "
                        f"{host['ffi_call_us']:.2f} |")
            continue
        rows.append(f"| {level} | {host['decode_step_us']:,.0f} | {host['direct_entry_us']:,.0f} "
                    f"| {host['host_us']:,.1f} ({host['host_percent']:.2f}%) | "
                    f"{host['marshal_us']:.1f} ({host['arguments']} args) | "
                    f"{host['ffi_call_us']:.2f} |")
    return rows


def compile_table(model: dict) -> list[str]:
    built = {lv: e["compile"] for lv, e in model["levels"].items() if "error" not in e["compile"]}
    if not built:
        return []
    stages = list(next(iter(built.values()))["stage_seconds"])
    passes: list[str] = []
    for c in built.values():
        passes += [p for p in c["pass_seconds"] if p not in passes]
    names = [f"{lv} (built earlier)" if c.get("reused") else lv for lv, c in built.items()]
    rows = ["| seconds | " + " | ".join(names) + " |", "|---|" + "---|" * len(built)]
    rows.append("| total | " + " | ".join(f"{c['seconds']:.1f}" for c in built.values()) + " |")
    for stage in stages:
        rows.append(f"| stage: {stage} | " + " | ".join(
            f"{c['stage_seconds'].get(stage, 0):.2f}" for c in built.values()) + " |")
    for name in passes:
        rows.append(f"| pass: {name} | " + " | ".join(
            f"{c['pass_seconds'][name]:.3f}" if name in c["pass_seconds"] else "—"
            for c in built.values()) + " |")
    return rows


def batch_lines(model: dict) -> list[str]:
    notes = []
    for level, entry in model["levels"].items():
        batch = entry.get("run", {}).get("batch_decode")
        if not batch or not passed(entry):
            continue
        if batch["available"]:
            notes.append(f"- {level}: batch {batch['batch']}: "
                         f"{fmt_rate(batch['tokens_per_second'], True)} tok/s in all")
        else:
            notes.append(f"- {level}: not available: {batch['reason']}")
    return notes


def model_section(model: dict, quantization: str) -> list[str]:
    plan, weights = model["plan"], model["weights"]
    origin = "random weights" if model["random_weights"] else "trained weights"
    title = (f"## {model['name']} ({quantization}, {weights['parameters']:,} parameters, "
             f"{origin})")
    about = (f"Weights: {weights['bytes'] / MB:,.1f} MB ({weights['bits_per_param']:.2f} bits per "
             f"parameter), converted in {weights['seconds']:.1f} s. Context window "
             f"{plan['context_window_size']}, prefill chunk {plan['prefill_chunk_size']}; decode "
             f"runs {plan['decode_tokens']} greedy steps after a {plan['decode_prompt_length']}-"
             "token prompt.")
    lines = [title, "", about, ""]
    lines += throughput_table(model) + ratio_lines(model)
    if model["name"] in ANCHORS:
        lines += ["", f"Reference point: {ANCHORS[model['name']]}"]
    lines += ["", "### Correctness gate", ""] + gate_table(model)
    if any("kernels" in e.get("run", {}) for e in model["levels"].values()):
        lines += ["", "### Per-kernel time (CUDA profiler, no graph)", ""] + kernel_lines(model)
    else:
        lines += ["", "### Per-token host overhead of decode", ""] + host_table(model)
    lines += ["", "### Batch decode", ""] + (batch_lines(model) or ["- no level passed"])
    lines += ["", "### Compile time", ""] + compile_table(model) + [""]
    return lines


METHOD = """## What the numbers are

- **decode tok/s**: greedy steps at batch 1 through `CompiledEngine.decode` (one compiled entry
  call per token, logits copied to NumPy, argmax in NumPy), after an untimed warm-up; one rate
  per run of N steps, median with min–max over the runs. The same loop drives transformers.
- **prefill tok/s @L**: one `prefill` of L tokens into an empty cache (chunked by the library's
  prefill chunk), L / seconds; **TTFT** is the same call plus choosing the first token.
- **peak RSS**: the peak resident memory of the process that loaded and measured that runner
  alone (each library and each peer runs in its own process; imports included).
- **host µs/token**: what a decode step costs outside the kernels, measured directly: the same
  `CompiledEngine.decode` call with the library's decode entry swapped for a compiled no-op that
  takes and checks exactly the same arguments (runtime checks, token and position tensors,
  argument passing, logits copied to NumPy). The host table splits off the argument passing (the
  no-op called directly) and shows an empty FFI call (`mlcc_metadata_nbytes`, no arguments) as the
  floor of any call; host code inside the entry (its kernel calls) counts as kernel time
  (benchmarks/host_overhead.py).
- **gate**: each level's greedy tokens after a fixed 16-token prompt are compared with O0's,
  and its logits along O0's tokens with the IR interpreter's (benchmarks/gate.py states the
  tolerance and the near-tie rule). A level that fails shows no speed.
- **peer**: HF transformers on the same checkpoint (the float weights the quantized ones were
  made from), same prompts, same thread count, `logits_to_keep=1` in prefill.
- A measurement repeats up to `repeats` runs and stops early once it has used its time budget
  (at least one run); `n=` says how many runs it got.
"""


def render_markdown(results: dict, plots: list[str]) -> str:
    spec = results["spec"]
    lines = [f"# mlcc {spec['device'].upper()} benchmark, {results['machine']['date'][:10]}", ""]
    lines += machine_lines(results) + [""]
    for model in results["models"]:
        lines += model_section(model, spec["quantization"])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines.append(METHOD)
    return "\n".join(lines)
