"""Does a compiled 7B library give the same logits every time? Run on the GPU machine.

    PYTHONPATH=$PWD/.device/site:$PWD TVM_USE_RUNTIME_LIB=1 \
        python3 benchmarks/cuda/determinism_probe.py LIB.so [--work DIR]

Makes (once, in the work folder: run_h200.py's when given the same) the random Llama-2-7B-shaped checkpoint of run_h200.py and
its q4f16_1 conversion, and HF transformers' float16 logits for the prompt. Then runs the same
32-token prompt and 8 greedy steps four times: fresh, again, after a 512-token prefill, and
with the decode CUDA graph. A library whose kernels read only what they should prints the same
tokens and the same md5 of the prefill logits every time, and "diff 0.0". The correlation
with transformers is only a loose sanity figure: every weight of this random model goes
through 4 bits.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

STEPS = 8


def main() -> None:
    import torch

    from benchmarks.cuda.run_h200 import make_checkpoint
    from mlcc.interface.convert_weight import convert_weight
    from mlcc.runtime_check.compiled import CompiledEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lib", type=Path)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mlcc-bench")
    args = parser.parse_args()
    work = args.work
    lib, params, hf_file = args.lib, work / "params", work / "hf_first.npy"
    prompt = np.random.default_rng(0).integers(0, 32000, 32).tolist()
    if not hf_file.is_file():
        model = make_checkpoint(work / "hf", 32)
        with torch.no_grad():
            logits = model(torch.tensor([prompt], device="cuda")).logits[0, -1]
        np.save(hf_file, logits.float().cpu().numpy())
        del model
        torch.cuda.empty_cache()
    if not (params / "ndarray-cache.json").is_file():
        convert_weight(work / "hf", "q4f16_1", params, device="cuda", progress=False)
    hf = np.load(hf_file)
    engine = CompiledEngine(lib, params, device="cuda")

    def run(tag: str) -> tuple[np.ndarray, np.ndarray]:
        engine.reset()
        logits = engine.append(prompt).copy()
        first, tokens = logits.copy(), []
        for _ in range(STEPS):
            tokens.append(int(np.argmax(logits)))
            logits = engine.decode(tokens[-1]).copy()
        corr = float(np.corrcoef(first.ravel(), hf.ravel())[0, 1])
        print(f"{tag}: tokens {tokens}, prefill logits md5 "
              f"{hashlib.md5(first.tobytes()).hexdigest()[:8]}, NaN {int(np.isnan(first).sum())}, "
              f"correlation with transformers float16 {corr:.4f}", flush=True)
        return first, logits

    base = run("fresh")
    differ = []
    for tag, before in (("again", None), ("after a 512-token prefill", "prefill"),
                        ("CUDA graph", "graph")):
        if before == "prefill":
            engine.prefill_logits(np.random.default_rng(1).integers(0, 32000, 512).tolist())
        if before == "graph":
            engine.cudagraph = True
        now = run(tag)
        gaps = [float(np.abs(now[i] - base[i]).max()) for i in (0, 1)]
        print(f"  diff from fresh: prefill logits {gaps[0]}, last decode logits {gaps[1]}",
              flush=True)
        if max(gaps) > 0 or not all(np.isfinite(now[1]).ravel()):
            differ.append(tag)
    if differ:
        sys.exit(f"{lib.name}: logits differ from the fresh run ({', '.join(differ)}): a kernel "
                 "reads memory it should not (see benchmarks/results/2026-11-29-h200-f)")
    print(f"{lib.name}: the same logits in all four runs")


if __name__ == "__main__":
    main()
