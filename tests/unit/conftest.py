"""Fixtures shared by the CUDA plan tests: the Llama-2-7B module lowered at O2 (q4f16_1) and its
decode plan after the GLU fusion (what the later plan passes start from)."""

from __future__ import annotations

import pytest
from test_cuda_glu_plan import lowered, plans

from mlcc.backends.cuda import glu


@pytest.fixture(scope="module")
def llama7b():
    return lowered("llama2_7b", "q4f16_1")


@pytest.fixture(scope="module")
def decode7b(llama7b):
    return glu.fuse_glu(plans(llama7b)["decode"])
