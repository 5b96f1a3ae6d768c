"""Measurements run in child processes, one per library or peer, so each has its own peak RSS.

The parent writes a job as JSON and runs `python -m benchmarks.child JOB RESULT`; the child
writes RESULT (JSON; logits go to .npy files named in the job) with its resident memory after
the imports and at its peak. A failure becomes {"error": one line} rather than a crash of the
sweep, and a child that outlives its timeout is stopped and reported the same way.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np

from mlcc.errors import MlccError

REPO = Path(__file__).resolve().parents[1]


def current_rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def compiled_job(job: dict) -> dict:
    """Gate outputs, prefill, TTFT, decode, host overhead (CPU) or per-kernel times and GPU
    memory (CUDA), and batch decode of one library."""
    from benchmarks.measure import (
        CompiledRunner,
        measure_batch_decode,
        measure_decode,
        measure_prefill,
    )

    device = job.get("device", "cpu")
    gpu = device.startswith("cuda")
    free_before = _gpu_free_bytes() if gpu else None
    runner = CompiledRunner(job["lib"], job["params"], device)
    result = {"load_seconds": runner.engine.load_seconds}
    result.update(gate_outputs(runner, job))
    prompt, repeats, budget = job["prompt"], job["repeats"], job["budget"]
    result["prefill"] = measure_prefill(runner, prompt, job["lengths"], repeats, budget)
    decode_prompt = prompt[:job["decode_prompt_length"]]
    result["decode"] = measure_decode(runner, decode_prompt, job["decode_tokens"], repeats, budget)
    if gpu:
        from benchmarks.kernels import kernel_breakdown, weight_bytes_per_token

        result["kernels"] = {
            "decode": kernel_breakdown(runner.engine, decode_prompt),
            "prefill": kernel_breakdown(runner.engine, prompt[:max(job["lengths"])], "prefill",
                                        steps=2),
            "weight_bytes_per_token": weight_bytes_per_token(runner.engine.metadata)}
        result["host_overhead"] = {"host_us": None, "reason": "measured on the CPU only"}
    else:
        from benchmarks.host_overhead import measure_host_overhead

        result["host_overhead"] = measure_host_overhead(runner.engine, decode_prompt, budget)
    result["batch_decode"] = measure_batch_decode(runner.engine, decode_prompt,
                                                  job["decode_tokens"], repeats, budget)
    if gpu:  # the engine allocates weights, KV pool and workspace up front: this is its peak
        result["gpu_mem_bytes"] = free_before - _gpu_free_bytes()
    return result


def _gpu_free_bytes() -> int:
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info()[0])


def gate_outputs(runner, job: dict) -> dict:
    """Greedy tokens after the gate prompt, and logits along the baseline's tokens (or along
    its own when it is the baseline), saved to job["logits_out"]."""
    from benchmarks.measure import forced_logits, greedy

    tokens, logits = greedy(runner, job["gate_prompt"], job["gate_tokens"])
    forced = job.get("forced_tokens")
    if forced is not None and list(forced) != tokens:
        logits = forced_logits(runner, job["gate_prompt"], forced)
    np.save(job["logits_out"], logits)
    return {"gate_tokens": tokens}


def reference_job(job: dict) -> dict:
    """The IR interpreter's logits along the baseline's greedy tokens."""
    from benchmarks.measure import forced_logits
    from mlcc.runtime_check.reference import ReferenceModel

    class ReferenceRunner:
        def __init__(self) -> None:
            self.model = ReferenceModel(job["params"])

        def prefill(self, ids):
            return self.model.prefill_logits(ids)

        def decode(self, token):
            return self.model.decode(token)

    np.save(job["logits_out"], forced_logits(ReferenceRunner(), job["gate_prompt"],
                                             job["forced_tokens"]))
    return {}


def peer_job(job: dict) -> dict:
    """The same measurements on HF transformers at one dtype (or compiled, on a GPU)."""
    from benchmarks.measure import greedy, measure_decode, measure_prefill
    from benchmarks.peer import CompiledRunner, TorchRunner
    from benchmarks.spec import COMPILED_PEER

    device = "cuda" if job.get("device", "cpu").startswith("cuda") else "cpu"
    if job["dtype"] == COMPILED_PEER:
        longest = max(len(job["prompt"]), job["decode_prompt_length"] + job["decode_tokens"],
                      len(job["gate_prompt"]) + job["gate_tokens"])
        runner = CompiledRunner(job["hf_dir"], longest + 8)
    else:
        runner = TorchRunner(job["hf_dir"], job["dtype"], job["threads"], device)
    tokens, _ = greedy(runner, job["gate_prompt"], job["gate_tokens"])
    prompt, repeats, budget = job["prompt"], job["repeats"], job["budget"]
    return {
        "attention": runner.attention,
        "gate_tokens": tokens,
        "prefill": measure_prefill(runner, prompt, job["lengths"], repeats, budget),
        "decode": measure_decode(runner, prompt[:job["decode_prompt_length"]],
                                 job["decode_tokens"], repeats, budget),
    }


JOBS = {"compiled": compiled_job, "reference": reference_job, "peer": peer_job}


def main(job_path: str, result_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    rss_start = current_rss_bytes()
    try:
        result = JOBS[job["kind"]](job)
    except MlccError as err:
        result = {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - any failure is one line; traceback in the log
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    result["rss"] = {"start_bytes": rss_start, "peak_bytes": peak_rss_bytes()}
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


def run_child(job: dict, work: Path, name: str, timeout: float, threads: int) -> dict:
    """Run `job` in a child process with `threads` threads for TVM and torch; its result."""
    work.mkdir(parents=True, exist_ok=True)
    job_path, result_path = work / f"{name}.job.json", work / f"{name}.result.json"
    log_path = work / f"{name}.log"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.child", str(job_path),
                                   str(result_path)], env=env, stdout=log, stderr=log,
                                  timeout=timeout, cwd=REPO, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {timeout:.0f} s (raise --child-timeout)"}
    if not result_path.is_file():
        return {"error": f"the child exited with status {proc.returncode} and no result; "
                         f"see {log_path}"}
    return json.loads(result_path.read_text())


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
