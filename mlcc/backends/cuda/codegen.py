"""Assemble the CUDA library: GPU kernels + host entries + metadata, built to one .so here.

The layout is the CPU library's (mlcc.backends.llvm.codegen): one launcher PrimFunc per distinct
kernel spec, one host entry per model function that carves intermediates out of the workspace
and calls the launchers in order with `T.call_cpacked` (each launcher launches its kernels), and
the two metadata functions, compiled for the host CPU. Every entry argument lives on the GPU.
The device code of all kernels is one CUDA source compiled by nvcc into a fatbin at build time.

    build(module, output, metadata, archs=("sm_90",), log=print)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlcc import ir
from mlcc.backends.cuda import (
    attention,
    chain,
    decode_attention,
    fusion,
    gemv_tma,
    glu,
    kernels,
    linear,
    moe,
    norm_fold,
    prefetch,
    sampling,
)
from mlcc.backends.cuda.kernels import COMMON_SOURCE, GRID_WAIT, CudaKernel
from mlcc.backends.cuda.toolchain import (
    DEFAULT_ARCHS,
    cuda_target,
    enable_cuda_codegen,
    host_target,
    install_hooks,
    pdl_supported,
    register_pdl_pipeline,
)
from mlcc.backends.llvm.codegen import entry_source, metadata_source, parse_functions
from mlcc.backends.output import write_library
from mlcc.backends.plan import (
    CCL_FUNCTIONS,
    EntryPlan,
    KernelCall,
    KernelSpec,
    plan_entry,
    with_tensor_parallel,
)
from mlcc.errors import MlccError
from mlcc.ir.types import Sym

STAGE = "compile"
Generator = Callable[[KernelSpec, str], CudaKernel]
GENERATORS: dict[str, Generator] = {
    "embedding": kernels.gen_embedding, "q_embedding": kernels.gen_embedding,
    "rms_norm": kernels.gen_norm, "layer_norm": kernels.gen_norm,
    "add_rms_norm": kernels.gen_norm, "add_layer_norm": kernels.gen_norm,
    "add": kernels.gen_elementwise, "mul": kernels.gen_elementwise,
    "scale": kernels.gen_elementwise, "silu": kernels.gen_elementwise,
    "gelu": kernels.gen_elementwise, "silu_mul": kernels.gen_elementwise,
    "cast": kernels.gen_elementwise, "gelu_mul": kernels.gen_elementwise,
    "scale_in_dtype": kernels.gen_elementwise, "positions": kernels.gen_positions,
    "linear": linear.gen_linear, "q_linear": linear.gen_linear,
    "qkv_attention": attention.gen_qkv_attention,
    "norm_q_linear": fusion.gen_norm_q_linear,
    "silu_mul_q_linear": fusion.gen_silu_mul_q_linear,
    glu.OP: glu.gen_linear_silu_mul,
    "last_row": kernels.gen_last, "last_logits": kernels.gen_last,
    **moe.MOE_GENERATORS,
    **norm_fold.GENERATORS,
    **chain.GENERATORS,
}


def kernel_for(spec: KernelSpec, name: str) -> CudaKernel:
    if spec.op not in GENERATORS:
        raise MlccError(STAGE, f"op {spec.op} has no CUDA kernel; supported: "
                        f"{', '.join(sorted(GENERATORS))}")
    if prefetch.ATTR in dict(spec.attrs):
        return prefetch.wrap_kernel(GENERATORS[spec.op](prefetch.base_spec(spec), name), spec)
    return GENERATORS[spec.op](spec, name)


def kernel_names(plans: list[EntryPlan]) -> dict[KernelSpec, str]:
    """One kernel name per distinct spec, in order of first call."""
    names: dict[KernelSpec, str] = {}
    for plan in plans:
        for call in plan.calls:
            if call.spec.op not in CCL_FUNCTIONS:  # collectives call the runtime, not a kernel
                names.setdefault(call.spec, f"k{len(names)}_{call.spec.op}")
    return names


def early_release(plans: list[EntryPlan], built: list[CudaKernel]) -> frozenset[str]:
    """Device functions of the kernels whose every call is followed by a one-block kernel, or
    (for a kernel of several blocks) by a TMA GEMV placed behind a latency-bound kernel
    (mlcc.backends.cuda.gemv_tma.released_early: one block an SM, copying its weights until
    its wait): with pdl they release that kernel at their start (mlcc.backends.cuda.toolchain).
    A one-block kernel ahead of a TMA GEMV releases it after its own wait, as ahead of any
    other; the GLU GEMV ahead of a TMA GEMV releases it when it ends."""
    names = kernel_names(plans)
    single = {k.name for k in built if k.single_block()}
    tma = {name for spec, name in names.items() if gemv_tma.released_early(spec)}
    verdict: dict[str, bool] = {}
    for plan in plans:
        # A decode chain never releases the next kernel early: every one of its blocks must
        # find an SM first, and the next kernel's waiting blocks would hold SMs beside it.
        specs = [None if call.spec.op == chain.OP else call.spec for call in plan.calls]
        kernels = [None if spec is None else names.get(spec) for spec in specs]
        for i, here in enumerate(kernels):
            if here is not None:
                after = kernels[i + 1] if i + 1 < len(kernels) else None
                ok = (after in single or (after in tma and here not in single)
                      or (after is not None and releases_attention(specs[i], specs[i + 1])))
                verdict[here] = verdict.get(here, True) and ok
    # the device function of a kernel's last launch (a call may run several, in order)
    last = {k.name: k.device_functions()[-1] for k in built}
    return frozenset(last[name] for name, ok in verdict.items() if ok)


def releases_attention(here: KernelSpec, after: KernelSpec) -> bool:
    """Whether the TMA GEMV `here` (behind a latency-bound kernel) releases the lean decode
    attention after it at its start: where the attention's block fits beside the GEMV's on
    an SM, it is placed while the GEMV streams and issues its loads of cached positions
    (mlcc.backends.cuda.decode_attention, `lean_attention`)."""
    return (gemv_tma.released_early(here) and after.op == "qkv_attention"
            and decode_attention.lean(after)
            and decode_attention.smem_bytes(after) <= gemv_tma.room_beside(here))


def wait_release(built: list[CudaKernel], early: frozenset[str]) -> frozenset[str]:
    """Device functions of the single-block kernels not in `early`: with pdl they release the
    next kernel once their own wait returns (mlcc.backends.cuda.toolchain)."""
    return frozenset(f for k in built if k.single_block() for f in k.device_functions()) - early


def library_parts(module: ir.Module, metadata: dict, prologues: bool = False,
                  fuse_glu: bool = False, l2_prefetch: int = 0, fold_norms: bool = False,
                  decode_chain: bool = False, tma_gemv: bool = False,
                  lean_attention: bool = False, tma_fold: bool = False,
                  ) -> tuple[list[CudaKernel], list[EntryPlan], str, str]:
    """Kernels (one per distinct spec), entry plans, host TVMScript, metadata TVMScript.

    `prologues` folds norms and silu_mul into the decode GEMVs (mlcc.backends.cuda.fusion);
    off by default: on the H200 the fused GEMVs took longer than the two kernels they replace.
    `fuse_glu` runs silu_mul in the epilogue of the gate_up GEMM (prefill) and of the decode GEMV
    (mlcc.backends.cuda.glu); the compile command sets it from the `fuse_glu_gemm` knob.
    `l2_prefetch` (bytes, 0 for none) lets the light kernel before each decode GEMV prefetch
    that many bytes of its weights into L2 (mlcc.backends.cuda.prefetch).
    `fold_norms` splits each decode add_rms_norm between the GEMVs around it
    (mlcc.backends.cuda.norm_fold; after the GLU fusion, whose calls it folds into).
    `decode_chain` runs each one-row layer from o_proj to the next GEMV as one persistent
    kernel (mlcc.backends.cuda.chain; sm_90 and newer, after the GLU fusion, before the fold).
    `tma_gemv` gives the one-row q4 GEMVs that fit and follow a latency-bound kernel the
    kernel of mlcc.backends.cuda.gemv_tma (sm_90 and newer, with pdl).
    `lean_attention` builds the one-launch decode attention lean (its first rotary angle
    before the wait, a warp's lane groups merged through shuffles: less shared memory), and
    with `tma_gemv` the qkv GEMV releases it at its start where it fits beside
    (`releases_attention`).
    `tma_fold` folds only the norms between two TMA GEMVs (`fold_norms` folds every norm it
    can, between one-shot block GEMVs too).
    """
    metadata = with_tensor_parallel(module, metadata)
    plans = [plan_entry(fn, module) for fn in module.functions]
    if fuse_glu:
        plans = [glu.fuse_glu(plan) for plan in plans]
    if decode_chain:
        plans = [chain.fuse_chain(plan) for plan in plans]
    if fold_norms or tma_fold:
        if tma_gemv:  # a norm between two TMA GEMVs is folded into them (norm_fold)
            plans = [gemv_tma.mark(plan) for plan in plans]
        plans = [norm_fold.fold_norms(plan, tma_only=not fold_norms) for plan in plans]
    if prologues:
        plans = [fusion.fuse_prologues(plan) for plan in plans]
    if l2_prefetch:
        plans = [prefetch.attach_prefetch(plan, l2_prefetch) for plan in plans]
    if tma_gemv:
        plans = [gemv_tma.mark(plan) for plan in plans]
    if lean_attention:
        plans = [_lean(plan) for plan in plans]
    names = kernel_names(plans)
    built = [kernel_for(spec, name) for spec, name in names.items()]
    # The next token picked on the GPU (mlcc.backends.cuda.sampling) from the logits row.
    vocab = metadata.get("model_config", {}).get("vocab_size")
    if vocab:
        built += sampling.sampling_kernels(int(vocab))
    entries = "\n\n".join(entry_source(plan, names) for plan in plans)
    # Shapes of every kernel, so profiles can be read per kernel (bytes moved, FLOPs).
    described = dict(metadata, kernel_specs={name: spec_json(spec)
                                             for spec, name in names.items()},
                     device_sampling=list(sampling.FUNCTIONS) if vocab else [])
    return built, plans, entries, metadata_source(described)


def _lean(plan: EntryPlan) -> EntryPlan:
    """The plan with its one-launch decode attentions marked lean."""
    calls = [KernelCall(decode_attention.mark_lean(c.spec), c.buffers) for c in plan.calls]
    return EntryPlan(plan.name, plan.args, calls, plan.workspace_bytes, plan.symbols,
                     plan.bounds)


def spec_json(spec: KernelSpec) -> dict:
    def tensors(items):
        return [[[str(d) if isinstance(d, Sym) else d for d in shape], dtype]
                for shape, dtype in items]

    return {"op": spec.op, "inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs)}


def device_source(built: list[CudaKernel]) -> str:
    return COMMON_SOURCE + prefetch.source() + "\n".join(k.device_source for k in built)


def build(module: ir.Module, output: Path, metadata: dict,
          archs: tuple[str, ...] = DEFAULT_ARCHS,
          log: Callable[[str], None] = lambda s: None, prologues: bool = False,
          fuse_glu: bool = False, pdl: bool = False, l2_prefetch: int = 0,
          fold_norms: bool = False, decode_chain: bool = False,
          tma_gemv: bool = False, lean_attention: bool = False,
          tma_fold: bool = False) -> dict[str, int]:
    """Build `module` into the shared library `output` (written under a temporary name).

    `pdl` launches every kernel with programmatic dependent launch (mlcc.backends.cuda.
    toolchain); it needs sm_90 or newer for every architecture of the fatbin, and is left off
    (with a log line) otherwise."""
    if output.suffix != ".so":
        raise MlccError(STAGE, f"-o {output}: the CUDA backend writes a shared library; use .so")
    if decode_chain and not pdl_supported(archs):
        log(f"decode_chain off: its bulk copies need sm_90 or newer ({', '.join(archs)})")
        decode_chain = False
    if tma_gemv and not pdl_supported(archs):
        log(f"tma_gemv off: its bulk copies need sm_90 or newer ({', '.join(archs)})")
        tma_gemv = False
    if tma_gemv and not pdl:
        log("tma_gemv off: its copies overlap the kernel ahead through pdl, which is off")
        tma_gemv = False
    built, plans, entries, meta = library_parts(module, metadata, prologues, fuse_glu,
                                                l2_prefetch, fold_norms, decode_chain,
                                                tma_gemv, lean_attention, tma_fold)
    counts: dict[str, int] = {}
    for k in built:
        op = k.name if k.name.startswith("mlcc_") else k.name.split("_", 1)[1]
        counts[op] = counts.get(op, 0) + 1
    log("CUDA kernels: " + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    if pdl and not pdl_supported(archs):
        log(f"pdl off: programmatic dependent launch needs sm_90 or newer ({', '.join(archs)})")
        pdl = False
    early = early_release(plans, built) if pdl else frozenset()
    after_wait = wait_release(built, early) if pdl else frozenset()
    compile_library(built, entries, meta, output, archs, pdl, early, after_wait)
    return counts


def compile_library(built: list[CudaKernel], host_source: str, cpu_source: str, output: Path,
                    archs: tuple[str, ...] = DEFAULT_ARCHS, pdl: bool = False,
                    early: frozenset[str] = frozenset(),
                    after_wait: frozenset[str] = frozenset()) -> None:
    """Compile kernels + host functions (cuda target) + CPU-only functions into `output`;
    `pdl`, `early` and `after_wait` as in mlcc.backends.cuda.toolchain.install_hooks."""
    import tvm

    enable_cuda_codegen()
    keep = os.environ.get("MLCC_CUDA_KEEP_SOURCE")
    self_waiting = frozenset([f"{k.name}_dev" for k in built if GRID_WAIT in k.device_source]
                             + [name for k in built for name in k.self_waiting])
    min_blocks = {f"{k.name}_kernel": k.min_blocks for k in built if k.min_blocks}
    install_hooks(device_source(built), archs, Path(keep) if keep else None, pdl, self_waiting,
                  early, min_blocks, after_wait)
    target, host = cuda_target(archs[0]), host_target()
    funcs = {}
    gpu_source = "\n\n".join([k.launcher for k in built] + ([host_source] if host_source else []))
    for name, f in _items(parse_functions(gpu_source)):
        funcs[name] = f.with_attr("target", target)
    if cpu_source:
        funcs.update({name: f.with_attr("target", host)
                      for name, f in _items(parse_functions(cpu_source))})
    pipeline = register_pdl_pipeline() if pdl else "default"
    with target:
        executable = tvm.compile(tvm.IRModule(funcs), target=target, tir_pipeline=pipeline)
    write_library(output, lambda path: executable.export_library(str(path)))


def _items(mod) -> list[tuple[str, object]]:
    return [(str(f.attrs["global_symbol"]), f) for _, f in mod.functions.items()]
