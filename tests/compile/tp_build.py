"""Compiling a library for N tensor-parallel shards, for tests and the multi-GPU benchmark.

`compile_model` (mlcc compile --overrides tensor_parallel_shards=N) builds sharded libraries from
a config; `compile_sharded` is the same flow (IR, passes, metadata, backend) with the shard count
as an argument rather than a config field, so that a model whose key/value heads are shared by
several ranks (fewer heads than shards), which the config check refuses, can be built too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlcc.backends import build_model_library
from mlcc.interface.compile import build_metadata
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme


def compile_sharded(arch, config, quantization: str, output: Path, shards: int,
                    device: str = "llvm", opt: str = "O2",
                    log: Callable[[str], None] = lambda s: None) -> dict:
    """Build the library of `config` for `shards` ranks into `output`; returns its metadata."""
    opt_config = parse_opt(opt)
    scheme = get_scheme(quantization)
    passes = build_pipeline(opt_config, scheme.model_dtype, quantization,
                            config.prefill_chunk_size, tensor_parallel_shards=shards)
    module = run_passes(arch.build_module(config), passes).module
    metadata = build_metadata(module, config, quantization, opt_config, device)
    build_model_library(module, Path(output), metadata, device=device, opt=opt_config, log=log)
    return metadata
