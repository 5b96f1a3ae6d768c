"""The compile pipeline: one flat list of passes chosen by optimization level and knobs.

Levels: O0 legalizes only (what the backend needs to run the model); O1 adds fusions that
remove memory traffic between neighbours; O2 adds work-saving rewrites (and the CUDA graph of
the decode step); O3 is accepted and builds what O2 builds: no knob is on only from O3 yet.
Knobs (`--opt "O2;fuse_add_norm=0"`) switch single passes or backend options on or off; an
opt-in knob (level OPT_IN) is on only when named (`--opt "O2;l2_prefetch=1"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlcc.errors import MlccError
from mlcc.passes.base import Pass
from mlcc.passes.cleanup import DeadCodeElimination
from mlcc.passes.dtype import ConvertModelDType
from mlcc.passes.fuse import FuseAddNorm, FuseQKVAttention, LMHeadLastRow
from mlcc.passes.layout import KVCacheLayout, PlanMemory, PrefillChunking
from mlcc.passes.moe import SparseMoE

OPT_IN = 4  # the level of knobs that no level turns on: only `name=1` does
# knob -> lowest level at which it is on by default
KNOBS: dict[str, tuple[int, str]] = {
    "fuse_add_norm": (1, "fuse residual add into the following RMSNorm/LayerNorm"),
    "lm_head_last_row": (2, "run the output projection on the last position only"),
    "fast_schedules": (1, "backend: parallel and vectorized schedules (off: plain fallback)"),
    "cpu_prefetch": (1, ("backend (CPU): the decode GEMV (4-bit codes, float weights) "
                         "prefetches the weight rows it reads two steps ahead")),
    # On at O2 since the replayed decode equals the plain one on an H200 (tests/gpu).
    "cudagraph": (2, "backend (CUDA): capture the decode step once and replay it"),
    "fuse_glu_gemm": (1, "backend (CUDA): silu_mul in the gate_up GEMM/GEMV epilogue"),
    # Opt-in: slower on an H200 (mlcc.backends.cuda.prefetch, results 2026-11-29-h200-e).
    "l2_prefetch": (OPT_IN, ("backend (CUDA, sm_90+): the light kernel before each decode "
                             "GEMV prefetches that GEMV's first weights into L2")),
    "fold_norms": (OPT_IN, ("backend (CUDA): each decode add_rms_norm split between the GEMVs "
                            "around it (the one ahead adds the residual, the next normalizes)")),
    # Opt-in: 0.99x in the 7B decode on an H200 (mlcc.backends.cuda.chain, 2026-11-30-h200-b).
    "decode_chain": (OPT_IN, ("backend (CUDA, sm_90+): each one-row decode layer from o_proj "
                              "to the next GEMV as one persistent kernel")),
    # On at O2: 1.05x in the 7B decode on an H200, the same logits, and 1.02-1.03x more with
    # down behind the GLU (mlcc.backends.cuda.gemv_tma, benchmarks/results/2026-11-30-h200-d
    # and -e).
    "tma_gemv": (2, ("backend (CUDA, sm_90+, with pdl): each one-row decode GEMV behind a norm or "
                     "the attention (gate_up + silu_mul included) streams its weights into "
                     "shared memory while that kernel runs; the GEMV behind the GLU GEMV (down) "
                     "streams them through the same kernel with 16 consumer warps")),
    # On at O2 since tests/gpu passed on it: 1.015x-1.019x in the 7B decode on an H200
    # (benchmarks/results/2026-11-30-h200-h and -i), the 7B logits within 5.42e-3 of the
    # plain attention's scale (2026-11-30-h200-g).
    "lean_attention": (2, ("backend (CUDA): the one-launch decode attention computes its "
                                "first rotary angle before its wait and merges a warp's lane "
                                "groups through shuffles (less shared memory); with tma_gemv "
                                "the qkv GEMV releases it at its start where it fits beside")),
    # On at O2: 1.02x in the 7B decode on an H200, and 1.037x more with the consumers released
    # at the producers' start (benchmarks/results/2026-11-30-h200-i), logits within 5.2e-3 of
    # the scale.
    "tma_fold": (2, ("backend (CUDA, sm_90+, with tma_gemv): each decode add_rms_norm between "
                     "two TMA GEMVs folded into them (o_proj and down add the residual, qkv and "
                     "the GLU GEMV normalize as they stage their row)")),
    "pdl": (2, ("backend (CUDA, sm_90+): programmatic dependent launch: each kernel starts "
                "while the one before it finishes")),
}


@dataclass(frozen=True)
class OptConfig:
    level: int = 2
    knobs: dict[str, bool] = field(default_factory=dict)

    def enabled(self, knob: str) -> bool:
        if knob in self.knobs:
            return self.knobs[knob]
        return self.level >= KNOBS[knob][0]

    def describe(self) -> str:
        on = [k for k in KNOBS if self.enabled(k)]
        return f"O{self.level} ({', '.join(on) or 'no optional passes'})"


def parse_opt(text: str | None) -> OptConfig:
    """Parse `--opt`: "O2", "O0;fuse_add_norm=1", or knobs alone (level O2)."""
    level, knobs = 2, {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        if part.upper() in ("O0", "O1", "O2", "O3"):
            level = int(part[1])
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in KNOBS or value.strip() not in ("0", "1"):
            raise MlccError("compile", f"--opt entry {part!r} is not understood: use O0..O3 "
                            f"and knobs name=0|1 with names {', '.join(KNOBS)}")
        knobs[key] = value.strip() == "1"
    return OptConfig(level, knobs)


def build_pipeline(opt: OptConfig, model_dtype: str, quantization: str,
                   prefill_chunk_size: int, tensor_parallel_shards: int = 1) -> list[Pass]:
    from mlcc.passes.quantize import QuantizeWeights
    from mlcc.passes.shard import ShardModule

    passes: list[Pass] = [
        # Legalize: dtypes and quantized weights as they are stored.
        ConvertModelDType(model_dtype),
        QuantizeWeights(quantization),
        # Tensor parallelism: each rank's program, on whole quantization groups.
        *([ShardModule(tensor_parallel_shards)] if tensor_parallel_shards > 1 else []),
        SparseMoE(),  # every level: dense experts cost E/top_k times the work and workspace
        # Attention reads the fused QKV projection and owns the KV cache layout.
        FuseQKVAttention(),
    ]
    # Optional fusions and rewrites.
    if opt.enabled("fuse_add_norm"):
        passes.append(FuseAddNorm())
    if opt.enabled("lm_head_last_row"):
        passes.append(LMHeadLastRow())
    passes += [
        # Global layout decisions, then cleanup and memory.
        PrefillChunking(prefill_chunk_size),
        KVCacheLayout(),
        DeadCodeElimination(),
        PlanMemory(),
    ]
    return passes
