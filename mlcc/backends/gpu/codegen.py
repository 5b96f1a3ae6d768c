"""Assemble a library for a TVM-generated GPU language (Metal, OpenCL, WebGPU/WGSL, ROCm).

The layout is the CPU library's (mlcc.backends.llvm.codegen): one kernel PrimFunc per distinct
kernel spec, one host entry per model function that carves intermediates out of the workspace
and calls the kernels in order with `T.call_cpacked`, and the two metadata functions. TVM splits
every kernel into device code in the target's language and host code for the host triple.

Kernels, first match wins:
    linear, q_linear       tensor expressions scheduled by dlight for the target (linear.py)
    norms                  one block per row, shared-memory tree reduction (norms.py)
    everything else        the portable kernel with its loop nests bound to threads (threads.py)

Every exported symbol (kernels, entries, metadata) starts with the system-library prefix when
one is given, and the IRModule carries `system_lib_prefix`, so the objects of a `.tar` register
themselves under that prefix and two models link into one program without clashes.

    build(module, output, metadata, target, log)          # target: targets.BuildTarget
    library_module(module, metadata, target, bind=True)   # the IRModule before tvm.compile
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlcc import ir
from mlcc.backends.gpu import linear, norms, threads
from mlcc.backends.gpu.export import export
from mlcc.backends.llvm.codegen import (
    entry_source,
    fallback_rule,
    metadata_source,
    parse_functions,
)
from mlcc.backends.output import write_library
from mlcc.backends.plan import KernelSpec, plan_entry
from mlcc.backends.targets import BuildTarget
from mlcc.errors import MlccError

STAGE = "compile"
# ops whose portable kernels loop serially over independent rows or features
INDEPENDENT_ROWS = ("last_row", "last_logits", "positions")
NORM_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm")


def portable_source(spec: KernelSpec, name: str) -> str:
    """The portable kernel of any op the CPU backend knows (its fallback rule)."""
    try:
        return fallback_rule(spec, name, True)
    except (KeyError, NotImplementedError) as err:
        raise MlccError(STAGE, f"op {spec.op} has no GPU kernel ({err}); compile this model "
                        "for --device cpu or cuda") from None


def kernel_func(spec: KernelSpec, name: str, target, limit: int, bind: bool,
                narrow: bool = False):
    """The PrimFunc of one kernel: scheduled for `target` (bind) or serial (CPU check);
    `narrow` indexes in int32 (WGSL has no 64-bit integers)."""
    if spec.op in ("linear", "q_linear"):
        func = linear.linear_compute(spec, name)
        if not bind:
            return func
        with target:
            scheduled = linear.schedule_linear(func, target)
        if scheduled is not None:
            return scheduled.with_attr("global_symbol", name)
    if spec.op in NORM_OPS:
        text = norms.gen_norm(spec, name, limit, bind)
    else:
        text = threads.bind_threads(portable_source(spec, name), threads.Grid(limit, bind),
                                    spec.op in INDEPENDENT_ROWS)
    if narrow:
        # TVM narrows WGSL indices to i32 but refuses int64 variables, so these kernels index
        # in int32 throughout (WebGPU buffers are far below 2^31 elements).
        text = text.replace("T.int64", "T.int32").replace('"int64"', '"int32"')
    return parse_functions(text)[name]


def library_module(module: ir.Module, metadata: dict, target: BuildTarget, bind: bool = True):
    """The IRModule of the whole library: kernels + entries (device target) + metadata (host)."""
    import tvm

    prefix = target.system_lib_prefix or ""
    device, host = target.tvm_target(), target.host_target()
    if not bind:
        device = host
    plans = [plan_entry(fn, module) for fn in module.functions]
    names: dict[KernelSpec, str] = {}
    for plan in plans:
        for call in plan.calls:
            if call.spec.op == "all_reduce":
                raise MlccError(STAGE, f"--device {target.preset.name}: tensor parallelism "
                                "(all_reduce between shards) has no runtime on this target; "
                                "compile with tensor_parallel_shards=1")
            names.setdefault(call.spec, f"{prefix}k{len(names)}_{call.spec.op}")
    # One block holds at most the target's thread limit; 256 keeps registers per thread sane.
    limit = min(256, target.preset.max_threads_per_block)
    funcs = {}
    for spec, name in names.items():
        func = kernel_func(spec, name, device, limit, bind, target.preset.kind == "webgpu")
        funcs[name] = func.with_attr("target", device)
    entries = "\n\n".join(entry_source(plan, names, prefix) for plan in plans)
    for name, func in _items(parse_functions(entries)):
        funcs[name] = func.with_attr("target", device)
    for name, func in _items(parse_functions(metadata_source(metadata, prefix))):
        funcs[name] = func.with_attr("target", host)
    mod = tvm.IRModule(funcs)
    if prefix:
        mod = mod.with_attr("system_lib_prefix", prefix)
    return mod, names


def build(module: ir.Module, output: Path, metadata: dict, target: BuildTarget,
          log: Callable[[str], None] = lambda s: None) -> dict[str, int]:
    """Build `module` into `output` for `target`; returns how many kernels each op got."""
    import tvm

    mod, names = library_module(module, metadata, target)
    counts: dict[str, int] = {}
    for spec in names:
        counts[spec.op] = counts.get(spec.op, 0) + 1
    log(f"{target.preset.kind} kernels: " + ", ".join(f"{op} x{n}"
                                                      for op, n in sorted(counts.items())))
    if target.preset.kind == "rocm":
        from mlcc.backends.gpu.export import install_rocm_hooks

        install_rocm_hooks()
    device = target.tvm_target()
    with device:
        executable = tvm.compile(mod, target=device)
    write_library(output, lambda path: export(executable, path, target))
    return counts


def _items(mod) -> list[tuple[str, object]]:
    return [(str(f.attrs["global_symbol"]), f) for _, f in mod.functions.items()]
