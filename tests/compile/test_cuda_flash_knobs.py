"""The knobs of the tensor-core prefill attention (mlcc.backends.cuda.flash) without a GPU.

* `{name}_touch`, which lets a warp of 16 query rows skip a key tile with 128-query tiles, is
  the kernel's own C++ compiled with g++: whenever it says "skip", no row of the warp sees any
  key of the tile under the CPU kernel's rule, and without a window it skips exactly the tiles
  with no visible pair.
* Every knob setting compiles with nvcc for sm_90 (7B shape, GQA, sliding window with sinks,
  head dims 64 and 80) without spills, within 48 KB of static shared memory and within the
  registers its block size leaves per thread; the launch follows QUERY_TILE.
The numbers themselves: tests/compile/test_cuda_flash_emulated.py runs each setting on host
threads against float32 attention.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from nvcc_probe import cubin_report, probe_stats
from test_cuda_flash_attention import CONFIGS, NVCC_CASES, attention_spec, reference_visible

from mlcc.backends.cuda import flash
from mlcc.backends.cuda.attention import gen_qkv_attention
from mlcc.backends.cuda.codegen import device_source
from mlcc.errors import MlccError

KNOBS = [(64, False, False), (128, False, False), (64, True, False), (128, True, False),
         (128, False, True), (128, True, True)]  # (QUERY_TILE, EXP2, PAIRED)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_warp_skip_never_drops_a_visible_pair(tmp_path):
    rng = np.random.default_rng(11)
    probes = [(int(p0), int(j)) for p0 in rng.integers(0, 700, 60) for j in range(0, 800, 64)]
    helpers = "\n".join(flash.visibility_source(f"c{i}", w, s) for i, (w, s) in enumerate(CONFIGS))
    calls = "".join(f'  printf("%d ", c{c}_touch({p0}, {p0 + 15}, {j}) ? 1 : 0);\n'
                    for c in range(len(CONFIGS)) for p0, j in probes)
    (tmp_path / "t.cpp").write_text("#include <cstdio>\n#define MLCC_ATTN_HD inline\n" + helpers
                                    + "int main() {\n" + calls + "}\n")
    subprocess.run(["g++", "-O1", "-o", str(tmp_path / "t"), str(tmp_path / "t.cpp")],
                   check=True)
    out = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True, check=True)
    touch = np.array(out.stdout.split(), int).reshape(len(CONFIGS), len(probes))
    skipped = 0
    for c, (window, sinks) in enumerate(CONFIGS):
        for (p0, j0), hit in zip(probes, touch[c]):
            keys = np.arange(j0, j0 + flash.TILE)
            seen = any(reference_visible(p, keys, window, sinks).any() for p in range(p0, p0 + 16))
            assert hit or not seen, (CONFIGS[c], p0, j0)
            if window <= 0:
                assert bool(hit) == seen, (CONFIGS[c], p0, j0)
            skipped += not hit
    assert skipped > 100, skipped


KNOB_IDS = [f"q{q}{'_exp2' * e}{'_paired' * p}" for q, e, p in KNOBS]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("knobs", KNOBS, ids=KNOB_IDS)
def test_every_knob_setting_compiles_for_sm90_without_spills(tmp_path, monkeypatch, knobs):
    monkeypatch.setattr(flash, "QUERY_TILE", knobs[0])
    monkeypatch.setattr(flash, "EXP2", knobs[1])
    monkeypatch.setattr(flash, "PAIRED", knobs[2])
    kernels = [gen_qkv_attention(spec, f"k{i}_qkv_attention", ldmatrix=True)
               for i, spec in enumerate(NVCC_CASES.values())]
    threads = knobs[0] // 16 * 32
    launch = (rf"// T.int64\({knobs[0]}\) \* T.int64\(\d+\), thread=\"blockIdx.x\"\):\s*"
              rf"for tx in T.thread_binding\({threads}, thread=\"threadIdx.x\"\):\s*"
              rf"T.evaluate\(T.call_extern\(\"int32\", \"k\d+_qkv_attention_flash\"")
    assert all(re.search(launch, k.launcher) for k in kernels), kernels[0].launcher
    probes = "".join(
        f"__global__ void __launch_bounds__({threads}) probe{i}(const half* a, half* y, "
        f"const int* s, const int* t, half* p, long long n) "
        f"{{ k{i}_qkv_attention_flash(a, y, s, t, p, n); }}\n" for i in range(len(kernels)))
    report = cubin_report(tmp_path, device_source(kernels) + probes)
    stats = probe_stats(report)
    assert len(stats) == len(kernels), report
    for index, spills, registers, smem in stats:
        name = list(NVCC_CASES)[index]
        assert spills == 0, (name, report)
        assert smem <= 48 * 1024, (name, smem)
        assert registers * threads <= 65536, (name, registers)


def test_query_tile_outside_64_and_128_is_refused(monkeypatch):
    monkeypatch.setattr(flash, "QUERY_TILE", 96)
    with pytest.raises(MlccError, match=r"\[compile\] flash.QUERY_TILE: must be 64 or 128, got 96"):
        gen_qkv_attention(attention_spec(), "k0_qkv_attention")
