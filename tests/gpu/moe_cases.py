"""The tiny Mixtral models and CUDA libraries that tests/gpu/test_moe_cuda.py runs.

Built where the TVM compiler is (`python tests/gpu/moe_cases.py OUT`) and carried to the GPU
machine, which has the TVM runtime only: OUT/manifest.json lists each case's library, model
folder (HF format, read by ReferenceModel there), quantization, prefill chunk and batch size.
The models keep Mixtral's structure at small sizes: GQA, 5 experts of which each token takes 2
(and 1 of 4 under a sliding window), random routers so tokens take different experts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TINY = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 128,
        "num_local_experts": 5, "num_experts_per_tok": 2}
MODELS = {"mixtral": {}, "mixtral_top1_window": {"num_local_experts": 4,
                                                 "num_experts_per_tok": 1, "sliding_window": 8}}
# (case, model, quantization, prefill chunk, max batch size)
CASES = [(f"mixtral_{q}", "mixtral", q, 4, 1) for q in ("q0f32", "q0f16", "q4f16_1")]
CASES += [("mixtral_top1_window_q0f32", "mixtral_top1_window", "q0f32", 4, 1),
          # a chunk of 64 rows: several 16-row tiles per expert, several ballot rounds
          ("mixtral_chunk64_q0f32", "mixtral", "q0f32", 64, 1),
          # batch_decode: a symbolic row count, so the grouped GEMM runs at decode too
          ("mixtral_batch_q4f16_1", "mixtral", "q4f16_1", 4, 4)]


def tiny_models(out: Path) -> dict[str, Path]:
    import torch
    import transformers

    dirs = {}
    for name, extra in MODELS.items():
        dirs[name] = out / "models" / name
        if not (dirs[name] / "config.json").is_file():
            torch.manual_seed(sum(map(ord, name)))
            config = transformers.MixtralConfig(**{**TINY, **extra})
            model = transformers.MixtralForCausalLM(config)
            with torch.no_grad():  # routers far from uniform, so routing differs per token
                for param_name, param in model.named_parameters():
                    if param.ndim == 2:
                        param.normal_(0.0, 0.5 if "gate.weight" in param_name else 0.1)
            model.save_pretrained(dirs[name])
    return dirs


def build_moe_cases(out: Path, log=print) -> dict:
    """Write every case's library under `out`; returns the manifest (also manifest.json)."""
    from mlcc.interface.compile import compile_model

    out.mkdir(parents=True, exist_ok=True)
    models = tiny_models(out)
    manifest = {}
    for name, model, quant, chunk, batch in CASES:
        lib = out / "libs" / f"{name}.so"
        if not lib.is_file():
            log(f"building {name}")
            compile_model(models[model], lib, quantization=quant, opt="O2", device="cuda",
                          overrides=f"prefill_chunk_size={chunk};max_batch_size={batch}")
        manifest[name] = {"lib": str(lib.relative_to(out)),
                          "model": str(models[model].relative_to(out)),
                          "quantization": quant, "chunk": chunk, "batch": batch}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


if __name__ == "__main__":
    build_moe_cases(Path(sys.argv[1]))
