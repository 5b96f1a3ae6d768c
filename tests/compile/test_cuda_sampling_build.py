"""The GPU sampling kernels build with nvcc and every CUDA library carries them.

Their numbers are checked on the GPU (tests/gpu/test_cuda_sampling.py); here: the kernels for
a small, a Llama and a Qwen-sized vocabulary compile into one library, and a model's CUDA
library lists them in its metadata (what the engine reads to keep logits on the GPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mlcc.backends.cuda.codegen import compile_library, library_parts
from mlcc.backends.cuda.sampling import FUNCTIONS, sampling_kernels

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"


def test_sampling_kernels_compile_for_several_vocabularies(tmp_path):
    import tvm

    for vocab in (512, 32000, 151936):
        out = tmp_path / f"sampling_{vocab}.so"
        compile_library(sampling_kernels(vocab), "", "", out)
        lib = tvm.runtime.load_module(str(out))
        for name in FUNCTIONS:
            assert lib.implements_function(name), (vocab, name)


def test_a_cuda_library_lists_its_sampling_kernels():
    from mlcc.interface.compile import load_model_config
    from mlcc.passes import build_pipeline, parse_opt, run_passes
    from mlcc.quant import get_scheme

    arch, config, quant, _ = load_model_config(STORIES, "q4f16_1", None)
    passes = build_pipeline(parse_opt("O2"), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    module = run_passes(arch.build_module(config), passes).module
    metadata = {"model_config": config.to_json()}
    built, _, _, meta_source = library_parts(module, metadata)
    names = [k.name for k in built]
    assert names[-2:] == list(FUNCTIONS)
    # the vocabulary is baked into the kernels as a constant
    assert f"i < {config.vocab_size}; i += 1024" in built[-2].device_source
    assert '"device_sampling":["mlcc_argmax","mlcc_sample"]' in meta_source
