"""The CPU (LLVM) backend.

Kernel generators, each returning a scheduled `tvm.tirx.PrimFunc` named by its first argument:
`kernels` (lookups, norms, epilogues, sampling), `linear` (GEMV/GEMM with fused group
dequantization), `paged_attention` (rope, KV append, paged attention); `schedules` holds the
ordered rules for block-structured kernels, `kernel_base` what generators share. `tuned_rules`
offers the linear kernels to the fused-op lowering of `codegen` (portable kernels: `fallback`,
`attention`); `bench` validates and times the linear kernels. Entries and libraries are built with
`mlcc.backends.entry` and `mlcc.backends.build`.
"""
