"""The models and CUDA libraries the GPU parity tests run, built where the TVM compiler is.

The GPU machine has only the TVM runtime, so the cases are built on the build machine
(`python -m tests.gpu.cuda_cases OUT`) and carried: OUT/manifest.json lists every case with its
library, the model folder its weights come from (HF format, read by ReferenceModel), the
quantization and the prefill chunk size. Tiny random HF models of each architecture are written
once with transformers; stories260K is copied from ../shared.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TINY = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
        "intermediate_size": 96, "max_position_embeddings": 64, "initializer_range": 0.2}
CHUNK = 4
# (case name, model, quantization, opt)
CASES = [("stories_q0f32", "stories260K", "q0f32", "O2"),
         ("stories_q4f16_1", "stories260K", "q4f16_1", "O2")]
CASES += [(f"{arch}_{q}", arch, q, "O2") for arch in ("llama", "mistral", "gpt_neox")
          for q in ("q0f32", "q0f16", "q4f16_1")]
CASES += [("llama_q0f32_O0", "llama", "q0f32", "O0")]
# Head dim 64 and long prompts for the tensor-core prefill attention: several 64-query and
# 64-key tiles, a partial tile, and (mistral) a sliding window whose ring wraps during prefill.
WIDE = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 256, "max_position_embeddings": 512}
WIDE_CHUNK = {"llama64": 128, "mistral64": 64, "qwen64": 128}
CASES += [("llama64_q0f16", "llama64", "q0f16", "O2"),
          ("mistral64_q4f16_1", "mistral64", "q4f16_1", "O2")]
# The opt-in L2 prefetch of the decode GEMVs' weights (mlcc.backends.cuda.prefetch)
CASES += [(f"{arch}_q4f16_1_l2pf", arch, "q4f16_1", "O2;l2_prefetch=1")
          for arch in ("llama", "mistral")]
# batch_decode entries: four sequences, one token each per call
CASES += [("llama_batch_q0f32", "llama", "q0f32", "O2"),
          ("mistral_batch_q4f16_1", "mistral", "q4f16_1", "O2")]
# Every decode GEMV (and the GLU mode) on the persistent kernel with the integer dot
# (gemv.DP2A), which the tuning database selects only for the 7B shapes it measured
CASES += [(f"{arch}_q4f16_1_dp2a", arch, "q4f16_1", "O2") for arch in ("llama", "mistral")]
CASES += [("mistral_batch_q4f16_1_dp2a", "mistral", "q4f16_1", "O2")]
# ... and on the one-shot GEMV with the integer dot (the 7B decode GEMVs' pick)
CASES += [(f"{arch}_q4f16_1_dp2a_block", arch, "q4f16_1", "O2") for arch in ("llama", "mistral")]
# ... with the opt-in folded norms (mlcc.backends.cuda.norm_fold), which need those GEMVs
CASES += [(f"{arch}_q4f16_1_fold_dp2a_block", arch, "q4f16_1", "O2;fold_norms=1")
          for arch in ("llama", "mistral")]
# The opt-in persistent decode chain (mlcc.backends.cuda.chain): hidden and intermediate sizes
# of whole 256-value blocks, which the tiny models lack; llama64 also without it, to compare
CASES += [(f"{arch}_q4f16_1_chain", arch, "q4f16_1", "O2;decode_chain=1")
          for arch in ("llama64", "mistral64")]
CASES += [("llama64_q4f16_1", "llama64", "q4f16_1", "O2")]
# The TMA GEMV (mlcc.backends.cuda.gemv_tma, on at O2: scale rows of whole 16-byte units, as
# K = 256 gives) against the same models without it
CASES += [(f"{arch}_q4f16_1_notma", arch, "q4f16_1", "O2;tma_gemv=0")
          for arch in ("llama64", "mistral64", "qwen64")]
# ... with a bias on the qkv projection (Qwen2), which the TMA GEMV adds as it stores
CASES += [("qwen64_q4f16_1", "qwen64", "q4f16_1", "O2")]
# The plain decode attention (O2 builds it lean and releases it from the qkv TMA GEMV at its
# start: mlcc.backends.cuda.decode_attention, codegen.releases_attention)
CASES += [(f"{arch}_q4f16_1_plainattn", arch, "q4f16_1", "O2;lean_attention=0")
          for arch in ("llama64", "mistral64", "qwen64")]
# The norms kept as kernels (O2 folds each one between two TMA GEMVs into them, knob tma_fold:
# mlcc.backends.cuda.norm_fold; o_proj and down add the residual, qkv and the GLU GEMV
# normalize as they stage)
CASES += [(f"{arch}_q4f16_1_nofold", arch, "q4f16_1", "O2;tma_fold=0")
          for arch in ("llama64", "mistral64", "qwen64")]


class _EveryShape(dict):
    """A database table answering `record` for every shape."""

    def __init__(self, record: dict) -> None:
        super().__init__()
        self.record = record

    def get(self, key, default=None):
        return self.record


def forced_dp2a(block: bool = False):
    """A context in which the tuning database picks the persistent GEMV with the integer dot
    for every decode shape, plain and GLU mode; with `block` the plain GEMVs take the one-shot
    GEMV with the integer dot instead, under a launch bound of four blocks an SM (the GLU mode
    has no one-shot form)."""
    from unittest import mock

    from mlcc.backends.cuda import gemv, tuning

    record = {"kind": "persistent", "blocks_per_sm": 2, "warps": 4, "rows_per_warp": 1,
              "rotate": True, "dot": gemv.DP2A}
    plain = {"kind": "block", "warps": 4, "rows_per_warp": 4, "dot": gemv.DP2A,
             "min_blocks": 4} if block else record
    database = {"best": _EveryShape(plain), "glu": _EveryShape(record)}
    return mock.patch.object(tuning, "_database", lambda: database)


def case_database(name: str):
    """The tuning database a case is built under: forced onto the integer dot for *_dp2a and
    *_dp2a_block, the shipped one otherwise."""
    if name.endswith("_dp2a_block"):
        return forced_dp2a(block=True)
    return forced_dp2a() if name.endswith("_dp2a") else contextlib.nullcontext()


def tiny_models(out: Path) -> dict[str, Path]:
    import torch
    import transformers

    makers = {
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**TINY, num_key_value_heads=2)),
        "mistral": lambda: transformers.MistralForCausalLM(
            transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=8)),
        "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(**{**TINY, "hidden_size": 128, "num_attention_heads": 4},
                                       rotary_pct=0.25, use_parallel_residual=True)),
    }
    makers["llama64"] = lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**TINY, **WIDE}))
    makers["mistral64"] = lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**{**TINY, **WIDE}, sliding_window=40))
    makers["qwen64"] = lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**{**TINY, **WIDE}))
    dirs = {}
    for name, make in makers.items():
        torch.manual_seed(sum(map(ord, name)))
        dirs[name] = out / "models" / name
        if not (dirs[name] / "config.json").is_file():
            make().save_pretrained(dirs[name])
    return dirs


def build_cases(out: Path, log=print) -> dict:
    """Write every case's library under `out` and return the manifest (also in manifest.json)."""
    from mlcc.interface.compile import compile_model

    out.mkdir(parents=True, exist_ok=True)
    models = tiny_models(out)
    stories = out / "models" / "stories260K"
    if not stories.is_dir():
        shutil.copytree(SHARED / "models" / "stories260K", stories)
    models["stories260K"] = stories
    manifest = {}
    for name, model, quant, opt in CASES:
        lib = out / "libs" / f"{name}.so"
        chunk = None if model == "stories260K" else \
            f"prefill_chunk_size={WIDE_CHUNK.get(model, CHUNK)}"
        if "_batch_" in name:
            chunk += ";max_batch_size=4"
        if not lib.is_file():
            log(f"building {name}")
            with case_database(name):
                compile_model(models[model], lib, quantization=quant, opt=opt, overrides=chunk,
                              device="cuda")
        manifest[name] = {"lib": str(lib.relative_to(out)), "model": str(
            models[model].relative_to(out)), "quantization": quant, "opt": opt}
    manifest["main_job"] = main_job(out / "main_job", stories, log)
    manifest["sampling"] = sampling_libraries(out / "libs", log)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def sampling_libraries(folder: Path, log=print) -> dict[str, str]:
    """The GPU sampling kernels alone for a Llama (32000) and a Qwen2 (151936) vocabulary."""
    from mlcc.backends.cuda.codegen import compile_library
    from mlcc.backends.cuda.sampling import sampling_kernels

    libs = {}
    for vocab in (32000, 151936):
        lib = folder / f"sampling_{vocab}.so"
        if not lib.is_file():
            log(f"building the sampling kernels for {vocab} tokens")
            compile_library(sampling_kernels(vocab), "", "", lib)
        libs[str(vocab)] = str(lib.relative_to(folder.parent))
    return libs


def main_job(folder: Path, model: Path, log=print) -> dict:
    """The README's commands with --device cuda: convert_weight, gen_config, compile (q0f32)."""
    params, lib = folder / "params", folder / "lib.so"
    commands = [
        ["convert_weight", str(model), "--quantization", "q0f32", "-o", str(params)],
        ["gen_config", str(model), "--quantization", "q0f32", "--conv-template", "LM", "-o",
         str(params)],
        ["compile", str(params / "mlc-chat-config.json"), "--device", "cuda", "-o", str(lib)],
    ]
    if not lib.is_file():
        for args in commands:
            log("mlcc " + " ".join(args[:1]))
            subprocess.run([sys.executable, "-m", "mlcc.cli", *args], check=True,
                           capture_output=True)
    return {"params": str(params.relative_to(folder.parent)),
            "lib": str(lib.relative_to(folder.parent))}


if __name__ == "__main__":
    build_cases(Path(sys.argv[1]))
