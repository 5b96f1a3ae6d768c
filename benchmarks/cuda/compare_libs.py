"""Do two builds of one model compute the same thing? Logits of a candidate library against a
reference library on the same parameters, step by step. Run on the GPU machine.

    PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 \
        python3 benchmarks/cuda/compare_libs.py PARAMS REFERENCE.so CANDIDATE.so [--steps 64]

Both prefill the same 32-token prompt; the reference then decodes greedily and the candidate
is fed the reference's tokens (teacher forcing), so every step compares logits of the same
context. Prints per step the largest |difference| as a fraction of the reference row's largest
|logit| and whether the argmax agrees (with the reference's top-two gap where it does not),
then how many greedy tokens the candidate, decoding on its own, shares with the reference
before the first difference. Exits non-zero when a difference exceeds --tolerance (default
0.02 of the scale, the float16 parity bound of the GPU tests) or the logits are not finite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def compare(ref, cand, prompt: list[int], steps: int, log=print) -> dict:
    """Teacher-forced and free-running comparison of two engines (reset(), append(tokens) and
    decode(token) returning logits): the largest difference as a fraction of the reference
    row's largest |logit|, the steps whose argmax differs (with the reference's top-two gap),
    the reference's greedy tokens and how many of them the candidate reproduces on its own."""
    ref_logits, cand_logits = ref.append(prompt).copy(), cand.append(prompt).copy()
    worst, flips, tokens = 0.0, [], []
    for step in range(steps + 1):
        r, c = ref_logits.ravel(), cand_logits.ravel()
        if not np.isfinite(c).all():
            raise ValueError(f"step {step}: the candidate's logits are not finite")
        rel = float(np.abs(r - c).max() / np.abs(r).max())
        worst = max(worst, rel)
        top = np.argsort(r)[-2:]
        same = int(np.argmax(c)) == int(top[1])
        if not same:
            flips.append(f"step {step} (gap {float(r[top[1]] - r[top[0]]):.4f})")
        log(f"step {step}: max |diff| {rel:.2e} of scale, argmax {'same' if same else 'differs'}")
        if step == steps:
            break
        tokens.append(int(top[1]))
        ref_logits, cand_logits = ref.decode(tokens[-1]).copy(), cand.decode(tokens[-1]).copy()
    cand.reset()
    logits, agree = cand.append(prompt).copy(), 0
    for token in tokens:
        if int(np.argmax(logits)) != token:
            break
        agree += 1
        logits = cand.decode(token).copy()
    return {"worst": worst, "flips": flips, "tokens": tokens, "agree": agree}


def main() -> None:
    from mlcc.runtime_check.compiled import CompiledEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", type=Path)
    parser.add_argument("reference", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    prompt = np.random.default_rng(0).integers(0, 32000, 32).tolist()
    ref = CompiledEngine(args.reference, args.params, device=args.device)
    cand = CompiledEngine(args.candidate, args.params, device=args.device)
    try:
        found = compare(ref, cand, prompt, args.steps, lambda line: print(line, flush=True))
    except ValueError as err:
        sys.exit(str(err))
    print(f"{args.candidate.name} against {args.reference.name}: largest difference "
          f"{found['worst']:.2e} of scale over {args.steps + 1} steps; argmax differs at "
          f"{', '.join(found['flips']) or 'no step'}; free-running greedy tokens equal: "
          f"{found['agree']}/{len(found['tokens'])}")
    if found["worst"] > args.tolerance:
        sys.exit(f"the candidate's logits differ by {found['worst']:.2e} of scale, above "
                 f"{args.tolerance}")


if __name__ == "__main__":
    main()
