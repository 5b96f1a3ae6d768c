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
once in float32 and once in torch float16. A third says where the float16 modes' remaining
error comes from: the float32 model on q0f16 / q4f16_1 weights, rounded to float16 at chosen
points only (nowhere, one kind of op, all but one kind, everywhere).

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

from mlcc import ir
from mlcc.passes.dtype import logits_projections
from mlcc.runtime_check.reference import ReferenceModel

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the transformers side lives with the tests
from hf_dequantized import (
    DESIGN_SCHEMES,
    dequantized_weights,
    float16_step,
    reference_dequantize,
    transformers_greedy,
)

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
            "rounding": rounding_points(cases), "seconds": round(time.time() - start, 1)}


# --- where the float16 error comes from -------------------------------------------------------


def rounding_role(node: ir.Node, heads: set[int]) -> str | None:
    """Which kind of float16 rounding point a node of the float32 model is, or None.

    Views (split, reshape) pass rounded values on unchanged, and the logits projection writes
    float32 in every mode, so neither is a rounding point.
    """
    if id(node) in heads or node.op in ("positions", "split", "reshape", "last_logits", "cast"):
        return None
    weight = next((v.name for v in node.inputs if v.kind == "param"), "")
    if node.op == "linear":
        return weight.split(".")[-2]  # qkv_proj, o_proj, gate_up_proj, down_proj
    if node.op == "rms_norm":
        return "final norm" if weight == "model.norm.weight" else "layer norms"
    return {"add": "residual add"}.get(node.op, node.op)


def round_at(fn: ir.Function, roles: set[str]) -> ir.Function:
    """`fn` with the outputs of nodes of the given roles rounded through float16."""
    heads = logits_projections(fn)
    renamed: dict[int, ir.Value] = {}
    nodes = []
    for node in fn.nodes:
        node = ir.Node(node.op, tuple(renamed.get(id(v), v) for v in node.inputs),
                       node.outputs, node.attrs)
        nodes.append(node)
        if rounding_role(node, heads) in roles:
            out = node.output
            half = ir.Value(out.name + ".f16", ir.TensorType("float16", out.shape))
            back = ir.Value(out.name + ".rounded", out.type)
            nodes += [ir.Node("cast", (out,), (half,), {"dtype": "float16"}),
                      ir.Node("cast", (half,), (back,), {"dtype": "float32"})]
            renamed[id(out)] = back
    return fn.replace(nodes=tuple(nodes),
                      outputs=tuple(renamed.get(id(v), v) for v in fn.outputs))


def mode_params(base: ReferenceModel, mode: str) -> dict[str, np.ndarray]:
    """float32 arrays holding exactly the values a mode's model computes with."""
    bits, group, dtype = DESIGN_SCHEMES[mode]
    params = {}
    for p in base.module.params:
        w = base.params[p.name]
        if bits and p.annotations.get("kind") in ("linear", "embedding"):
            params[p.name] = reference_dequantize(w, bits, group, dtype)
        else:
            params[p.name] = w.astype(dtype).astype(np.float32)
    return params


def teacher_forced_rounded(module: ir.Module, params: dict, prompt: list[int],
                           tokens: list[int]) -> np.ndarray:
    cache = ir.KVCacheState(next(v.type for v in module.function("decode").inputs
                                 if isinstance(v.type, ir.KVCacheType)))
    rows = [ir.interpret(module, "prefill", [np.array(prompt, np.int32), cache], params)[0]]
    for token in tokens[:-1]:
        rows.append(ir.interpret(module, "decode", [np.array([token], np.int32), cache],
                                 params)[0])
    return np.stack(rows)


def rounding_points(cases: list[dict]) -> dict:
    """q0f16 first-step error against float32 transformers, and for each q4f16_1 step where
    ReferenceModel's argmax differs from float32 transformers, the margin of transformers' top
    token over its second in our logits (negative: we pick the second), by rounding points."""
    base = ReferenceModel(STORIES, quantization="q0f32")
    heads = logits_projections(base.module.function("decode"))
    roles = list(dict.fromkeys(r for n in base.module.function("decode").nodes
                               if (r := rounding_role(n, heads)) is not None))
    choices = ([("nowhere", set())] + [(f"only {r}", {r}) for r in roles]
               + [(f"all but {r}", set(roles) - {r}) for r in roles]
               + [("everywhere (the float16 model)", set(roles))])
    fp32 = dequantized_weights(STORIES, "q0f32")
    q0_want = [transformers_greedy(fp32, c["prompt_token_ids"], 1)[1][0] for c in cases]
    q4 = dequantized_weights(STORIES, "q4f16_1")
    q4_runs = [(c, *transformers_greedy(q4, c["prompt_token_ids"], STEPS)) for c in cases]
    q0_params, q4_params = mode_params(base, "q0f16"), mode_params(base, "q4f16_1")

    def rounded(keep: set[str]) -> ir.Module:
        module = base.module
        for fn in base.module.functions:
            module = module.with_function(round_at(fn, keep))
        return module

    everywhere = rounded(set(roles))
    splits = []  # (prompt, step, transformers' top id, second id)
    for case, tokens, logits in q4_runs:
        ours = teacher_forced_rounded(everywhere, q4_params, case["prompt_token_ids"], tokens)
        for step in np.nonzero(ours.argmax(axis=1) != np.array(tokens))[0]:
            second = int(np.argsort(logits[step])[-2])
            splits.append((case, int(step), tokens[step], second))
    rows = []
    for label, keep in choices:
        module = rounded(keep)
        errors = [float(np.abs(teacher_forced_rounded(module, q0_params, c["prompt_token_ids"],
                                                      [0])[0] - want).max())
                  for c, want in zip(cases, q0_want)]
        margins = []
        for case, step, top, second in splits:
            tokens = next(t for c, t, _ in q4_runs if c is case)
            row = teacher_forced_rounded(module, q4_params, case["prompt_token_ids"],
                                         tokens[:step + 1])[step]
            margins.append(float(row[top] - row[second]))
        rows.append({"label": label, "q0f16": errors, "margins": margins})
    return {"splits": [(c["prompt"], step, top, second) for c, step, top, second in splits],
            "rows": rows}


def rounding_table(result: dict) -> list[str]:
    rounding = result["rounding"]
    splits = [f'"{p[:12]}..." step {step} (ids {top} vs {second})'
              for p, step, top, second in rounding["splits"]]
    lines = [("| float16 rounding at | q0f16: first-step max abs error vs float32, per prompt | "
              "q4f16_1: our margin of transformers' top token over its second at "
              f"{'; '.join(splits) or 'no split'} |"),
             "| --- | --- | --- |"]
    for row in rounding["rows"]:
        lines.append(f"| {row['label']} | {' '.join(f'{e:.4f}' for e in row['q0f16'])} | "
                     f"{' '.join(f'{m:+.6f}' for m in row['margins']) or '-'} |")
    return lines


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
        "Where the float16 modes' error comes from: the float32 IR model on the mode's weights",
        "(dequantized as the mode reads them), its op outputs rounded to float16 only at the",
        "points named (the KV cache keeps what it is given; the logits projection writes float32",
        "in every row, as in the float16 modes). q0f16 is compared with float32 transformers on",
        "the float32 weights; the q4f16_1 column revisits each step where the float16 model's",
        "teacher-forced argmax differs from float32 transformers on the same weights.",
        "",
        *rounding_table(result),
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
