"""Which pairs of float16 rounding points, left in float32, meet issue 4's two fidelity bounds.

    python benchmarks/quant_fidelity_pairs.py [--designs]
        [--write benchmarks/results/quant_fidelity.md]

The third table of quant_fidelity.py leaves one kind of rounding point out at a time. This
leaves out none, one or two kinds (every pair of the 11 kinds) and checks both conditions of
issue 4 point 3 in full: q0f16's first-step logits within 2e-2 of float32 transformers on all
four reference prompts, and q4f16_1's teacher-forced argmax equal to float32 transformers' greedy
token at every one of the 256 steps (transformers on the same weights, quantized and dequantized
by the independent NumPy quantizer). The float32 IR model with only the named outputs rounded
keeps whatever it is given in its KV cache, so leaving out qkv_proj or rope also leaves keys
or values in float32 there.

With --designs it checks instead the mixed-precision designs of DESIGNS, sets of rounding points
that a float16 engine could keep in float32 as a matter of design rather than of this model.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_fidelity as qf


# name: the kinds of rounding point left in float32. The KV cache takes what qkv_proj and rope
# give it, so every design that keeps a float16 cache rounds both.
DESIGNS = {
    "float32 residual stream": ("residual add",),
    "float32 residual stream and GEMV outputs; float16 only where a GEMV reads its input and in "
    "the KV cache": ("residual add", "o_proj", "gate_up_proj", "down_proj"),
    "the same, and a float32 final norm into the output projection":
        ("residual add", "o_proj", "gate_up_proj", "down_proj", "final norm"),
    "float32 GLU (gate_up_proj and silu_mul outputs)": ("gate_up_proj", "silu_mul"),
}


def measure(designs: bool = False) -> list[dict]:
    cases = qf.reference_cases()
    base = qf.ReferenceModel(qf.STORIES, quantization="q0f32")
    heads = qf.logits_projections(base.module.function("decode"))
    roles = list(dict.fromkeys(r for n in base.module.function("decode").nodes
                               if (r := qf.rounding_role(n, heads)) is not None))
    fp32 = qf.dequantized_weights(qf.STORIES, "q0f32")
    q0_want = [qf.transformers_greedy(fp32, c["prompt_token_ids"], 1)[1][0] for c in cases]
    q4 = qf.dequantized_weights(qf.STORIES, "q4f16_1")
    q4_runs = [(c, qf.transformers_greedy(q4, c["prompt_token_ids"], qf.STEPS)[0])
               for c in cases]
    q0_params, q4_params = qf.mode_params(base, "q0f16"), qf.mode_params(base, "q4f16_1")
    if designs:
        unknown = {r for left in DESIGNS.values() for r in left} - set(roles)
        assert not unknown, f"DESIGNS names rounding points the model lacks: {unknown}"
        sets = list(DESIGNS.items())
    else:
        sets = [(None, left) for left in
                [()] + [(r,) for r in roles] + list(itertools.combinations(roles, 2))]
    rows = []
    for name, left in sets:
        module = base.module
        for fn in base.module.functions:
            module = module.with_function(qf.round_at(fn, set(roles) - set(left)))
        errors = [float(np.abs(qf.teacher_forced_rounded(module, q0_params, c["prompt_token_ids"],
                                                         [0])[0] - want).max())
                  for c, want in zip(cases, q0_want)]
        parts = []
        for case, tokens in q4_runs:
            ours = qf.teacher_forced_rounded(module, q4_params, case["prompt_token_ids"], tokens)
            wrong = np.nonzero(ours.argmax(axis=1) != np.array(tokens))[0]
            if len(wrong):
                parts.append(f"{case['prompt'][:16]}... step {int(wrong[0])}")
        rows.append({"name": name, "left": left, "q0f16": errors, "parts": parts,
                     "both": max(errors) < 2e-2 and not parts})
    return rows


def misses(row: dict) -> str:
    worst = max(row["q0f16"])
    out = ([f"q0f16 {worst:.4f}"] if worst >= 2e-2 else []) + row["parts"]
    return ", ".join(out) or "both hold"


def report(rows: list[dict], seconds: float) -> str:
    both = [r for r in rows if r["both"]]
    intro = (f"Produced by `python benchmarks/quant_fidelity_pairs.py --write "
             f"benchmarks/results/quant_fidelity.md` in {seconds:.0f} s. Rounding points left "
             f"out: none, each of the 11 kinds, every pair of them ({len(rows)} models); "
             f"{len(both)} meet both bounds:")
    lines = ["", "## Pairs of float16 rounding points left in float32 (issue 4 point 3)", "",
             intro, "",
             "| left in float32 | q0f16: first-step max abs error vs float32, per prompt |",
             "| --- | --- |"]
    for r in both:
        lines.append(f"| {', '.join(r['left'])} | "
                     f"{' '.join(f'{e:.4f}' for e in r['q0f16'])} |")
    alone = [r for r in rows if len(r["left"]) <= 1]
    lines += ["", "Left out alone, and what misses: "
              + "; ".join(f"{', '.join(r['left']) or 'none'}: {misses(r)}" for r in alone) + "."]
    return "\n".join(lines) + "\n"


def design_report(rows: list[dict], seconds: float) -> str:
    intro = (f"Produced by `python benchmarks/quant_fidelity_pairs.py --designs --write "
             f"benchmarks/results/quant_fidelity.md` in {seconds:.0f} s. The same two checks "
             "as the pairs above (q0f16's first-step logits within 2e-2 of float32 "
             "transformers; q4f16_1's teacher-forced argmax equal to float32 transformers' "
             "greedy token at all 256 steps), on float16 models that keep the named rounding "
             "points in float32.")
    header = "| design | left in float32 | q0f16: first-step max abs error, per prompt | misses |"
    lines = ["", "## Mixed-precision designs against issue 4's float16 bounds", "", intro, "",
             header, "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {', '.join(r['left'])} | "
                     f"{' '.join(f'{e:.4f}' for e in r['q0f16'])} | {misses(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="append the section to this markdown file")
    parser.add_argument("--designs", action="store_true",
                        help="check the mixed-precision designs of DESIGNS instead of the pairs")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = measure(args.designs)
    seconds = time.perf_counter() - start
    text = design_report(rows, seconds) if args.designs else report(rows, seconds)
    print(text)
    if args.write:
        with args.write.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
