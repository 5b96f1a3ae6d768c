"""Backends: lower the passes' output to TensorIR kernels and build one library per device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlcc.backends.targets import BuildTarget


def build_model_library(module, output: Path, metadata: dict,
                        device: str | BuildTarget = "llvm", host: str | None = None, opt=None,
                        system_lib_prefix: str | None = None,
                        log: Callable[[str], None] = lambda s: None) -> dict[str, int]:
    """Build `module` (after the pass pipeline) into the library `output` for `device`."""
    if isinstance(device, BuildTarget):
        # metal, opencl, webgpu, rocm (a preset or a TVM target JSON): TVM-generated device code
        from mlcc.backends.gpu.codegen import build as build_gpu

        return build_gpu(module, Path(output), metadata, device, log)
    if device == "cuda" or device.startswith(("cuda:", "cuda-")):
        from mlcc.backends.cuda.codegen import build as build_cuda
        from mlcc.backends.cuda.toolchain import DEFAULT_ARCHS

        # "cuda-sm_90,sm_80": a fatbin for each listed architecture
        archs = tuple(device.split("-", 1)[1].split(",")) if "-" in device else DEFAULT_ARCHS
        from mlcc.backends.cuda.prefetch import DEFAULT_BUDGET
        from mlcc.passes.pipeline import OptConfig

        opt = opt or OptConfig()  # no options: the default level's knobs
        fuse_glu, pdl = opt.enabled("fuse_glu_gemm"), opt.enabled("pdl")
        l2 = DEFAULT_BUDGET if opt.enabled("l2_prefetch") else 0
        fold, chain = opt.enabled("fold_norms"), opt.enabled("decode_chain")
        tma, lean = opt.enabled("tma_gemv"), opt.enabled("lean_attention")
        return build_cuda(module, Path(output), metadata, archs, log, fuse_glu=fuse_glu, pdl=pdl,
                          l2_prefetch=l2, fold_norms=fold, decode_chain=chain, tma_gemv=tma,
                          lean_attention=lean, tma_fold=opt.enabled("tma_fold"))
    if device != "llvm":
        from mlcc.errors import MlccError

        raise MlccError("compile", f"no backend for device {device!r} in this build; use cpu")
    from mlcc.backends.llvm.codegen import build
    from mlcc.backends.llvm.tuned_rules import tuned_rule, tuned_rule_without_prefetch

    fast = True if opt is None else opt.enabled("fast_schedules")
    # Tuned GEMV/GEMM kernels first (they decline at O0), the portable kernels as the fallback.
    return build(module, Path(output), metadata, host, fast, system_lib_prefix, log,
                 rules=[tuned_rule if opt is None or opt.enabled("cpu_prefetch")
                        else tuned_rule_without_prefetch])
