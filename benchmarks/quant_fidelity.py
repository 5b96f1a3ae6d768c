"""What each quantization mode costs on stories260K: perplexity, greedy agreement, logit error.

Every mode runs through ReferenceModel (the NumPy IR interpreter; weights quantized from the HF
folder by mlcc.quant, activations in the mode's dtype). The reference continuations are the 64
float32 greedy tokens after each of the 4 prompts of reference.json (transformers, cross-checked
with llama2.c). Per mode:
- perplexity of those 256 tokens, teacher-forced (prefill the prompt, then decode each token);
- greedy agreement with float32: how many of the 64 free-running greedy tokens come before the
  first difference, and how often the teacher-forced argmax is the float32 token;
- first-step logit error against float32 (q0f32) over the whole vocabulary.
A second table compares each mode with transformers' LlamaForCausalLM run on the same weights,
quantized and dequantized by the independent NumPy quantizer of tests/unit/group_reference.py,
once in float32 and once in torch float16.

    python benchmarks/quant_fidelity.py
    python benchmarks/quant_fidelity.py --write benchmarks/results/quant_fidelity.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mlcc.runtime_check.reference import ReferenceModel

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the transformers side lives with the tests
from hf_dequantized import dequantized_weights, float16_step, transformers_greedy

MODES = ("q0f32", "q0f16", "q8f16_1", "q4f32_1", "q4f16_1", "q3f16_1")
STEPS = 64
COMMAND = "python benchmarks/quant_fidelity.py --write benchmarks/results/quant_fidelity.md"


def reference_cases() -> list[dict]:
    return json.loads((STORIES / "reference.json").read_text())["cases"]


def teacher_forced(model: ReferenceModel, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) float32 logits before each token, the tokens fed one by one."""
    rows = [model.prefill_logits(prompt)] + [model.decode(t) for t in tokens[:-1]]
    return np.stack(rows).astype(np.float32)


def token_nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood of each token under its row of logits, in float64."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return log_z - x[np.arange(len(tokens)), tokens]


def agreed_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def stored_bytes(model: ReferenceModel) -> int:
    return sum(p.nbytes for p in model.params.values())


def measure_mode(model: ReferenceModel, cases: list[dict]) -> dict:
    """Perplexity, greedy agreement and first-step logits of one mode on the reference cases."""
    nll, forced, prefixes, greedy, first = [], [], [], [], []
    for case in cases:
        prompt, want = case["prompt_token_ids"], case["greedy_token_ids"][:STEPS]
        rows = teacher_forced(model, prompt, want)
        nll.append(token_nll(rows, want))
        forced.append(float(np.mean(rows.argmax(axis=1) == np.array(want))))
        tokens = model.generate_greedy(prompt, STEPS)
        greedy.append(tokens)
        prefixes.append(agreed_prefix(tokens, want))
        first.append(rows[0])
    return {"perplexity": float(np.exp(np.concatenate(nll).mean())),
            "forced_agreement": float(np.mean(forced)), "prefixes": prefixes,
            "greedy": greedy, "first": first}


def first_step_error(first: list[np.ndarray], base: list[np.ndarray]) -> dict:
    """Max and mean |logit - float32 logit| at the first step, and the max over the scale."""
    errors = [np.abs(got - want) for got, want in zip(first, base)]
    return {"max": max(float(e.max()) for e in errors),
            "mean": float(np.mean([e.mean() for e in errors])),
            "of_scale": max(float(e.max() / np.abs(w).max()) for e, w in zip(errors, base))}


def compare_with_transformers(model: ReferenceModel, mode: str, dtype: torch.dtype,
                              cases: list[dict], greedy: list[list[int]]) -> dict:
    """ReferenceModel against transformers on the same dequantized weights, run in `dtype`."""
    hf = dequantized_weights(STORIES, mode).to(dtype)
    first, worst, prefixes, mismatches = [], [], [], []
    for case, ours_greedy in zip(cases, greedy):
        tokens, theirs = transformers_greedy(hf, case["prompt_token_ids"], STEPS)
        ours = teacher_forced(model, case["prompt_token_ids"], tokens)
        scale = np.abs(theirs).max(axis=1)
        relative = np.abs(ours - theirs).max(axis=1) / scale
        first.append(float(relative[0]))
        worst.append(float(relative.max()))
        prefixes.append(agreed_prefix(ours_greedy, tokens))
        for step in np.nonzero(ours.argmax(axis=1) != np.array(tokens))[0]:
            ordered = np.sort(theirs[step])
            gap = float(ordered[-1] - ordered[-2])
            mismatches.append(f"{case['prompt'][:12]}... step {step}: gap {gap:.4f} "
                              f"({gap / float16_step(ordered[-1]):.2f} float16 steps)")
    return {"first": max(first), "worst": max(worst), "prefixes": prefixes,
            "mismatches": mismatches}


def measure() -> dict:
    cases = reference_cases()
    start = time.time()
    modes, versus = {}, {}
    for mode in MODES:
        model = ReferenceModel(STORIES, quantization=mode)
        if mode == "q0f32":
            float_count = stored_bytes(model) // 4  # the tied lm_head is stored once
        modes[mode] = measure_mode(model, cases)
        modes[mode]["bits"] = 8 * stored_bytes(model) / float_count
        if mode == "q0f32":
            continue
        for dtype in (torch.float32, torch.float16):
            versus[(mode, str(dtype).removeprefix("torch."))] = compare_with_transformers(
                model, mode, dtype, cases, modes[mode]["greedy"])
    base = modes["q0f32"]["first"]
    for mode in MODES:
        modes[mode]["error"] = first_step_error(modes[mode]["first"], base)
    return {"cases": [c["prompt"] for c in cases], "modes": modes, "versus": versus,
            "seconds": round(time.time() - start, 1)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}"
                         for name in ("numpy", "torch", "transformers"))
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {versions}")


def mode_table(result: dict) -> list[str]:
    base = result["modes"]["q0f32"]["perplexity"]
    lines = [("| mode | bits/param | perplexity | vs q0f32 | teacher-forced top-1 = fp32 | "
             "greedy tokens equal to fp32 before the first difference (per prompt) | "
             "first-step max abs error | as % of scale | mean abs error |"),
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for mode, m in result["modes"].items():
        e = m["error"]
        lines.append(
            f"| {mode} | {m['bits']:.2f} | {m['perplexity']:.3f} | "
            f"{100 * (m['perplexity'] / base - 1):+.1f}% | {100 * m['forced_agreement']:.1f}% | "
            f"{', '.join(f'{p}/{STEPS}' for p in m['prefixes'])} | {e['max']:.4f} | "
            f"{100 * e['of_scale']:.2f}% | {e['mean']:.4f} |")
    return lines


def versus_table(result: dict) -> list[str]:
    lines = [("| mode | transformers dtype | first-step max error, % of scale | over 64 steps | "
             "greedy tokens equal before the first difference | teacher-forced argmax "
             "differences (transformers' top-two gap) |"),
             "| --- | --- | ---: | ---: | --- | --- |"]
    for (mode, dtype), v in result["versus"].items():
        lines.append(
            f"| {mode} | {dtype} | {100 * v['first']:.3f}% | {100 * v['worst']:.3f}% | "
            f"{', '.join(f'{p}/{STEPS}' for p in v['prefixes'])} | "
            f"{'; '.join(v['mismatches']) or 'none'} |")
    return lines


def report(result: dict) -> str:
    """The Markdown written to benchmarks/results/quant_fidelity.md."""
    prompts = ", ".join(f'"{p}"' for p in result["cases"])
    return "\n".join([
        f"## {datetime.date.today().isoformat()}: stories260K, {len(MODES)} modes",
        "",
        f"Produced by `{COMMAND}` in {result['seconds']} s.",
        f"Machine: {machine()}.",
        "",
        f"Prompts (reference.json): {prompts}. Reference continuations: the {STEPS} float32",
        "greedy tokens after each prompt (256 tokens). Every mode runs through ReferenceModel",
        "(NumPy IR interpreter, weights quantized by mlcc.quant, activations in the mode's dtype).",
        "Scale of a logits row: its largest |logit|. bits/param: stored bytes x 8 over the float",
        "parameter count.",
        "",
        *mode_table(result),
        "",
        "ReferenceModel against transformers (LlamaForCausalLM, eager attention) on the same",
        "weights, quantized and dequantized by tests/unit/group_reference.py (norms rounded to the",
        "mode's dtype). Greedy runs are compared token by token; the teacher-forced columns feed",
        "transformers' own greedy tokens to both. A float16 step is the distance between",
        "neighbouring float16 values at the top logit (0.0078 for logits of 8 to 16).",
        "",
        *versus_table(result),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, default=None, help="append a Markdown section")
    args = parser.parse_args()
    if not STORIES.is_dir():
        raise SystemExit(f"[bench] {STORIES}: not found; the shared models folder must sit "
                         "next to the repository")
    text = report(measure())
    print(text)
    if args.write is not None:
        with open(args.write, "a") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
