"""The block order of the tensor-core prefill attention (mlcc.backends.cuda.attention.order_source).

The kernel's own C++ rank function is compiled with g++ and evaluated for many grid sizes and SM
counts: it must be a permutation of the blocks (every query tile and head is computed exactly
once), heaviest first when the grid needs more than one wave, and, in a model of the block
scheduler that hands out blocks k and k + sms to the same SM, it must lower the largest number
of key tiles one SM works through for a 512-token causal prefill of 32 heads on 132 SMs.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from mlcc.backends.cuda.attention import TILE, order_source

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

GRIDS = [(b, s) for s in (1, 3, 8, 132) for b in (1, 2, 7, 131, 132, 133, 256, 264, 265, 1024)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("order")
    calls = "".join(f"  for (long long k = 0; k < {b}; ++k) printf(\"%lld \", "
                    f"k0_rank(k, {b}, {s}));\n  printf(\"\\n\");\n" for b, s in GRIDS)
    (folder / "o.cpp").write_text("#include <cstdio>\n#define MLCC_ATTN_HD inline\n"
                                  + order_source("k0") + "int main() {\n" + calls + "}\n")
    subprocess.run(["g++", "-O1", "-o", str(folder / "o"), str(folder / "o.cpp")], check=True)
    out = subprocess.run([str(folder / "o")], capture_output=True, text=True, check=True).stdout
    return {grid: np.array(line.split(), np.int64) for grid, line in zip(GRIDS, out.splitlines())}


def test_ranks_are_a_permutation_of_the_blocks(ranks):
    for (blocks, _), r in ranks.items():
        assert sorted(r.tolist()) == list(range(blocks))


def test_grids_beyond_one_wave_keep_the_heaviest_first_order(ranks):
    for (blocks, sms), r in ranks.items():
        if blocks > 2 * sms:
            assert r.tolist() == list(range(blocks))


def max_sm_work(rank: np.ndarray, sms: int, tiles: int, heads: int) -> int:
    """Key tiles per SM when block k runs on SM k % sms; rank r is query tile
    tiles - 1 - r // heads, which visits that many + 1 key tiles of a causal chunk at 0."""
    work = tiles - rank // heads
    return int(np.bincount(np.arange(rank.size) % sms, weights=work, minlength=sms).max())


def test_one_wave_pairs_heavy_and_light_query_tiles(ranks):
    tiles, heads, sms = 512 // TILE, 32, 132
    blocks = tiles * heads
    assert max_sm_work(np.arange(blocks), sms, tiles, heads) == 12  # heaviest first
    assert max_sm_work(ranks[(blocks, sms)], sms, tiles, heads) == 9
