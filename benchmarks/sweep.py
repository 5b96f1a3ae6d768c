"""One sweep: for each model, convert once, compile every level, gate, measure, and the peer.

Work files (converted weights, libraries, logits, child logs) go to
<cache>/work/<model>-<quantization>/ and are replaced by the next sweep; only the results
folder is meant to be kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.child import run_child
from benchmarks.gate import GateVerdict, check_baseline, check_level, logits_tolerance
from benchmarks.models import BenchModel, resolve_bench_model
from benchmarks.spec import BASELINE_LEVEL, SweepSpec, bench_prompt, capped_lengths, level_slug
from mlcc.errors import MlccError

Log = Callable[[str], None]
GATE_PROMPT_LENGTH = 16
CONV_TEMPLATE = "LM"  # plain continuation; the harness feeds token ids, never chat text


def log_to_stderr(message: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare_weights(model: BenchModel, spec: SweepSpec, params: Path, log: Log) -> dict:
    """convert_weight + gen_config into `params`, as a user runs them."""
    from mlcc.interface.convert_weight import convert_weight
    from mlcc.interface.gen_config import gen_config

    device = "cuda" if spec.on_gpu else "cpu"
    log(f"{model.name}: convert_weight {spec.quantization} --device {device} -> {params}")
    start = time.perf_counter()
    summary = convert_weight(model.hf_dir, spec.quantization, params, device=device,
                             overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    gen_config(model.hf_dir, spec.quantization, CONV_TEMPLATE, params)
    return {"seconds": seconds, "parameters": summary["parameters"], "bytes": summary["bytes"],
            "bits_per_param": summary["bits_per_param"]}


def compile_level(params: Path, level: str, lib: Path, spec: SweepSpec, cache: Path,
                  log: Log, model_name: str = "") -> dict:
    """Compile one level; its time per stage and per pass, or the error.

    A library built earlier from the same mlc-chat-config.json, level, overrides and mlcc
    sources is reused (with the compile times it took then), so a re-run after a failure
    later in the sweep does not compile again; any change to mlcc's code builds anew.
    """
    if spec.prebuilt:
        return prebuilt_level(params, level, lib, spec, model_name, log)
    from mlcc.interface.compile import compile_model

    overrides = f"max_batch_size={spec.max_batch_size}" if spec.max_batch_size > 1 else None
    config = (params / "mlc-chat-config.json").read_text()
    key = hashlib.sha256("\n".join([config, level, str(overrides), spec.device,
                                     mlcc_source_digest()]).encode()).hexdigest()[:20]
    stored_lib, stored_record = cache / "libs" / f"{key}.so", cache / "libs" / f"{key}.json"
    if spec.reuse_libraries and stored_lib.is_file() and stored_record.is_file():
        log(f"compile --opt {level!r}: reusing {stored_lib} (same config and mlcc sources)")
        shutil.copyfile(stored_lib, lib)
        return {**json.loads(stored_record.read_text()), "lib": str(lib), "reused": True}
    log(f"compile --opt {level!r} -> {lib.name}")
    start = time.perf_counter()
    try:
        result = compile_model(params / "mlc-chat-config.json", lib, device=spec.device,
                               opt=level, overrides=overrides)
    except MlccError as err:
        return {"error": str(err)}
    record = {"seconds": time.perf_counter() - start, "stage_seconds": result.stage_seconds,
              "pass_seconds": result.pass_seconds, "opt": result.metadata.get("opt"),
              "lib_bytes": lib.stat().st_size}
    stored_lib.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lib, stored_lib)
    stored_record.write_text(json.dumps(record))
    return {**record, "lib": str(lib), "reused": False}


def build_manifest_path(folder: Path, model_name: str) -> Path:
    return folder / model_name / "build.json"


def prebuilt_level(params: Path, level: str, lib: Path, spec: SweepSpec, name: str,
                   log: Log) -> dict:
    """A level compiled earlier by `python -m benchmarks build` (on a machine with the TVM
    compiler), after checking it was built from the same mlc-chat-config.json."""
    folder = Path(spec.prebuilt)
    manifest_path = build_manifest_path(folder, name)
    if not manifest_path.is_file():
        raise MlccError("benchmarks", f"--prebuilt {folder}: no {manifest_path.relative_to(folder)}"
                        f"; run `python -m benchmarks build --model ...` for {name} first")
    manifest = json.loads(manifest_path.read_text())
    ours = json.loads((params / "mlc-chat-config.json").read_text())
    differ = sorted(k for k in set(ours) | set(manifest["chat_config"])
                    if ours.get(k) != manifest["chat_config"].get(k))
    if differ:
        raise MlccError("benchmarks", f"--prebuilt {folder}: the libraries of {name} were built "
                        f"from another mlc-chat-config.json (fields {', '.join(differ)} differ); "
                        "build them again from this model and quantization")
    record = manifest["levels"].get(level)
    if record is None or "error" in record:
        return {"error": (record or {}).get("error") or f"level {level} was not built into "
                f"{folder}; add it to `build --opt`"}
    shutil.copyfile(folder / name / record["file"], lib)
    log(f"compile --opt {level!r}: prebuilt {record['file']} ({record['seconds']:.1f} s when "
        "built)")
    return {**{k: v for k, v in record.items() if k != "file"}, "lib": str(lib),
            "reused": True}


def build_model(name: str, spec: SweepSpec, cache: Path, out: Path, log: Log) -> dict:
    """Compile every level of one model into `out`/<model>/ without its weights: what a GPU
    machine without the TVM compiler needs for `run --prebuilt` (`python -m benchmarks
    build`)."""
    from benchmarks.models import resolve_config_only
    from mlcc.interface.gen_config import gen_config

    model = resolve_config_only(name, cache)
    work = cache / "work" / f"build-{model.name}-{spec.quantization}"
    shutil.rmtree(work, ignore_errors=True)
    params = work / "params"
    gen_config(model.hf_dir, spec.quantization, CONV_TEMPLATE, params)
    target = out / model.name
    target.mkdir(parents=True, exist_ok=True)
    levels = {}
    for level in spec.compiled_levels:
        file = f"{level_slug(level)}.so"
        record = compile_level(params, level, target / file, spec, cache, log)
        record.pop("lib", None)
        levels[level] = {**record, "file": file}
    manifest = {"model": model.name, "device": spec.device, "quantization": spec.quantization,
                "max_batch_size": spec.max_batch_size,
                "chat_config": json.loads((params / "mlc-chat-config.json").read_text()),
                "levels": levels}
    build_manifest_path(out, model.name).write_text(json.dumps(manifest, indent=1))
    return manifest


def mlcc_source_digest() -> str:
    """A digest of every Python file of the mlcc package (names and contents)."""
    import mlcc

    root = Path(mlcc.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def measurement_plan(params: Path, spec: SweepSpec) -> dict:
    """The prompts and lengths every runner of this model gets."""
    chat = json.loads((params / "mlc-chat-config.json").read_text())
    vocab = chat["vocab_size"]
    bos = chat.get("bos_token_id")
    bos = bos if isinstance(bos, int) else None
    lengths = capped_lengths(spec.prompt_lengths, chat["context_window_size"],
                             spec.decode_tokens)
    room = chat["context_window_size"] - spec.gate_tokens - 1
    return {
        "lengths": lengths,
        "prompt": bench_prompt(vocab, max(lengths), bos, seed=0),
        "gate_prompt": bench_prompt(vocab, max(1, min(GATE_PROMPT_LENGTH, room)), bos, seed=1),
        "gate_tokens": spec.gate_tokens,
        "decode_prompt_length": lengths[0],
        "decode_tokens": spec.decode_tokens,
        "repeats": spec.repeats,
        "budget": spec.budget_seconds,
        "context_window_size": chat["context_window_size"],
        "prefill_chunk_size": chat["prefill_chunk_size"],
        "model_dtype": _model_dtype(spec.quantization),
    }


def runner_settings(plan: dict) -> dict:
    """What every measuring child (library or peer) gets from the plan."""
    keys = ("lengths", "prompt", "gate_prompt", "gate_tokens", "decode_prompt_length",
            "decode_tokens", "repeats", "budget")
    return {key: plan[key] for key in keys}


def _model_dtype(quantization: str) -> str:
    from mlcc.quant import get_scheme

    return get_scheme(quantization).model_dtype


def measure_levels(levels: dict, params: Path, plan: dict, work: Path, spec: SweepSpec,
                   log: Log) -> None:
    """Run each compiled level in a child (baseline first), then the gate, into `levels`."""
    job = {"kind": "compiled", "params": str(params), "device": spec.device,
           **runner_settings(plan)}
    baseline: list[int] | None = None
    for level in spec.compiled_levels:
        entry = levels[level]
        if "error" in entry["compile"]:
            continue
        log(f"measure {level}")
        logits = work / f"logits-{level_slug(level)}.npy"
        entry["run"] = run_child({**job, "lib": entry["compile"]["lib"], "logits_out": str(logits),
                                  "forced_tokens": baseline}, work, f"run-{level_slug(level)}",
                                 spec.child_timeout, spec.threads)
        entry["logits_file"] = str(logits)
        if level == BASELINE_LEVEL and "error" not in entry["run"]:
            baseline = entry["run"]["gate_tokens"]
    apply_gate(levels, baseline, params, plan, work, spec, log)


def apply_gate(levels: dict, baseline: list[int] | None, params: Path, plan: dict, work: Path,
               spec: SweepSpec, log: Log) -> None:
    if baseline is None:
        for entry in levels.values():
            entry["gate"] = {"passed": False, "note": "no O0 baseline (it failed to build or run)"}
        return
    steps = min(spec.reference_steps, len(baseline))
    if steps == 0:
        apply_gate_without_reference(levels, baseline, plan)
        return
    log("reference logits from the IR interpreter along O0's tokens")
    ref_path = work / "logits-reference.npy"
    ref_run = run_child({"kind": "reference", "params": str(params), "logits_out": str(ref_path),
                         "gate_prompt": plan["gate_prompt"], "forced_tokens": baseline[:steps]},
                        work, "reference", spec.child_timeout, spec.threads)
    if "error" in ref_run:
        for entry in levels.values():
            entry["gate"] = {"passed": False, "note": f"no reference: {ref_run['error']}"}
        return
    reference = np.load(ref_path).astype(np.float64)
    tolerance = logits_tolerance(reference, plan["model_dtype"])
    baseline_logits = np.load(levels[BASELINE_LEVEL]["logits_file"]).astype(np.float64)
    for level, entry in levels.items():
        run = entry.get("run", {})
        if "error" in entry["compile"] or "error" in run or not run:
            entry["gate"] = {"passed": False, "note": "not run"}
            continue
        logits = np.load(entry["logits_file"])
        if level == BASELINE_LEVEL:
            verdict = check_baseline(reference, logits, baseline, tolerance)
        else:
            verdict = check_level(reference, baseline_logits, logits, run["gate_tokens"],
                                  baseline, tolerance)
        entry["gate"] = verdict.to_json()
        log(f"gate {level}: {'pass' if verdict.passed else 'FAIL'} ({verdict.note}; max logit "
            f"error {verdict.max_error:.3g}, tolerance {verdict.tolerance:.3g})")


def apply_gate_without_reference(levels: dict, baseline: list[int], plan: dict) -> None:
    """--reference-steps 0 (models too big for the interpreter): O0 is the baseline as it is,
    every other level is held to O0's logits and tokens."""
    baseline_logits = np.load(levels[BASELINE_LEVEL]["logits_file"]).astype(np.float64)
    tolerance = logits_tolerance(baseline_logits, plan["model_dtype"])
    for level, entry in levels.items():
        run = entry.get("run", {})
        if "error" in entry["compile"] or "error" in run or not run:
            entry["gate"] = {"passed": False, "note": "not run"}
            continue
        if level == BASELINE_LEVEL:
            entry["gate"] = GateVerdict(True, 0.0, tolerance, len(baseline), len(baseline),
                                        "the baseline; not checked against the interpreter "
                                        "(--reference-steps 0)").to_json()
            continue
        verdict = check_level(None, baseline_logits, np.load(entry["logits_file"]),
                              run["gate_tokens"], baseline, tolerance)
        entry["gate"] = verdict.to_json()


def measure_peers(model: BenchModel, plan: dict, work: Path, spec: SweepSpec, log: Log) -> dict:
    job = {"kind": "peer", "hf_dir": str(model.hf_dir), "threads": spec.threads,
           "device": spec.device, **runner_settings(plan)}
    peers = {}
    for dtype in spec.peers:
        log(f"peer: transformers {dtype} on {'cuda' if spec.on_gpu else 'cpu'}")
        peers[dtype] = run_child({**job, "dtype": dtype}, work, f"peer-{dtype}",
                                 spec.child_timeout, spec.threads)
    return peers


def bench_model(name: str, spec: SweepSpec, cache: Path, log: Log) -> dict:
    """Everything measured for one model."""
    model = resolve_bench_model(name, cache)
    work = cache / "work" / f"{model.name}-{spec.quantization}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = work / "params"
    weights = prepare_weights(model, spec, params, log)
    plan = measurement_plan(params, spec)
    levels = {level: {"compile": compile_level(params, level, work / f"{level_slug(level)}.so",
                                               spec, cache, log, model.name)}
              for level in spec.compiled_levels}
    measure_levels(levels, params, plan, work, spec, log)
    peers = measure_peers(model, plan, work, spec, log)
    for entry in levels.values():  # work files are replaced by the next sweep: not results
        entry.pop("logits_file", None)
        entry["compile"].pop("lib", None)
    shown = {k: v for k, v in plan.items() if k not in ("prompt", "gate_prompt")}
    return {"name": model.name, "hf_dir": str(model.hf_dir), "random_weights": model.random_weights,
            "weights": weights, "plan": shown, "gate_prompt": plan["gate_prompt"],
            "levels": levels, "requested_levels": list(spec.levels), "peers": peers}
