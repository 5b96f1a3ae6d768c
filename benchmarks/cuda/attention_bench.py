"""Validate-then-benchmark of prefill attention: the tensor-core kernel against the CUDA-core one.

Build here (TVM compiler + nvcc), run on the GPU machine (TVM runtime + torch):

    python benchmarks/cuda/attention_bench.py build .device/attention
    python benchmarks/cuda/attention_bench.py run .device/attention $OUT/attention_bench.json

`build` writes one library with the launchers below for each KV configuration and cases.json:
the shipped kernels (`*_flash`: append + tensor-core attention, ldmatrix fragments, balanced block order;
`*_flash_plain`: the same with fragments from plain shared-memory loads; `*_flash_desc`: with
the blocks heaviest first instead of balanced), the kernels of commit BASELINE
(`*_flash_base`: per-feature rotary in the append and the query tile, a page lookup per 16-byte
copy; its text is read with `git show`, so `build` runs in the repository) and append + the
CUDA-core attention (`*_cuda_cores`), and the shipped kernel under the knobs of
mlcc.backends.cuda.flash (KNOB_VARIANTS: `*_flash_q128`, 128 consecutive query rows on eight
warps; `*_flash_q128_paired`, query tiles a and T - 1 - a on eight warps (no window only; the
window config builds the consecutive kernel under that name); `*_flash_exp2`, the base-2
softmax; `*_flash_q128_exp2`, `*_flash_q128_paired_exp2`: both). The
configurations: the Llama-2-7B layer (32 heads of 128, page size 16 as the llama2_7b preset),
GQA 32/8, and a sliding window of 256 with 4 sinks in a ring. Cases: a 512-token chunk at
position 0 and a 256-token chunk at 512 (7B), a 512-token chunk at 0 (GQA), a 512-token chunk
at 1024 (window: the ring has wrapped, most key tiles are skipped), and two short chunks that
start inside a tile and end in a partial one.

`run` fills a random page pool (random page table, random keys and values at every earlier
position) and random qkv rows, calls each launcher once, and checks (1) the chunk's keys and
values in the pool against rotary embedding of the qkv rows in NumPy and (2) the output
against float32 attention (torch, TF32 off) over exactly the visible keys read back from the
pool, with q rotated and rounded to float16 as the kernels do. Only launchers that agree are
timed: 20 back-to-back calls replayed as one CUDA graph, median of 7 replays, per call (append
+ attention). Per layer of a 7B prefill this is the attention
op; 32 layers make the model's share.

Decode (one row, DECODE_CASES): `*_decode`, the shipped one-launch kernel of
mlcc.backends.cuda.decode_attention (positions split over blocks, the last block merges),
against the same kernel under the block shapes of DECODE_SHAPES (`*_decode_w16_u8`: sixteen
warps, eight positions a lane group a round, one block per head up to 256 positions, ...) and
`*_decode_two`, append + the CUDA-core attend kernel it replaces. (The split knobs alone,
CHUNK, SOLO and MAX_SPLITS, were measured with this script on 2026-11-29: see
benchmarks/results/2026-11-29-h200-d.)
Validated the same way (the new row's key and value in the pool, the output against float32
attention), then timed over LAYERS copies of the pool, one per call in turn (a decode step's
32 layers: the keys and values come from HBM, not L2), 32 calls per graph: microseconds per
layer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import module_at, replay_us

PAGE = 16
CONFIGS = {  # name: (q heads, kv heads, head dim, window (-1: none), sinks)
    "mha": (32, 32, 128, -1, 0),
    "gqa": (32, 8, 128, -1, 0),
    "window": (32, 8, 128, 256, 4),
}
CASES = [  # (name, config, chunk start, chunk length)
    ("7b_prefill_512", "mha", 0, 512),
    ("7b_chunk_256_at_512", "mha", 512, 256),
    ("gqa_32_8_prefill_512", "gqa", 0, 512),
    ("window_256_sinks_4_chunk_512_at_1024", "window", 1024, 512),
    # partial tiles, chunks starting inside a tile: validated like the others
    ("gqa_32_8_chunk_200_at_37", "gqa", 37, 200),
    ("window_256_sinks_4_chunk_77_at_300", "window", 300, 77),
]
CHUNK = 512  # the ring of a window holds sinks + window + one chunk, as layout.py sizes it
KNOB_VARIANTS = {  # variant: (flash.QUERY_TILE, flash.EXP2, flash.PAIRED) while it is written
    "flash_q128": (128, False, False),
    "flash_exp2": (64, True, False),
    "flash_q128_exp2": (128, True, False),
    "flash_q128_paired": (128, False, True),
    "flash_q128_paired_exp2": (128, True, True),
}
VARIANTS = ("flash", "flash_plain", "flash_desc", "flash_base", "cuda_cores", *KNOB_VARIANTS)
BASELINE = "03c319d"  # attention.py before the rotary pairs and the per-row page lookups
TOLERANCE = 1e-2  # absolute, outputs are weighted means of N(0, 1) values
DECODE_CASES = [  # (name, config, position of the one new token)
    ("7b_decode_at_32", "mha", 32),
    ("7b_decode_at_100", "mha", 100),
    ("7b_decode_at_160", "mha", 160),
    ("7b_decode_at_300", "mha", 300),
    ("7b_decode_at_500", "mha", 500),
    ("7b_decode_at_700", "mha", 700),
    ("7b_decode_at_1000", "mha", 1000),
    ("7b_decode_at_1500", "mha", 1500),
    ("7b_decode_at_2000", "mha", 2000),
    ("7b_decode_at_4000", "mha", 4000),
    ("gqa_32_8_decode_at_2000", "gqa", 2000),
    ("window_256_sinks_4_decode_at_1500", "window", 1500),  # the ring has wrapped
]
DECODE_SHAPES = {  # variant: gen_decode_attention knobs (the rest as shipped)
    "decode_w8": {"warps": 8, "solo": 128},
    "decode_w16": {"warps": 16, "solo": 256},
    "decode_w8_u8": {"warps": 8, "unroll": 8, "solo": 256},
    "decode_w16_u8": {"warps": 16, "unroll": 8, "solo": 256},
    "decode_w16_u8_s512": {"warps": 16, "unroll": 8, "solo": 512, "wide": 512},
}
DECODE_VARIANTS = ("decode", *DECODE_SHAPES, "decode_two")
LAYERS = 32


def kv_layout(config: str) -> dict:
    _, hkv, d, window, sinks = CONFIGS[config]
    ring = window > 0
    capacity = -(-(sinks + window + CHUNK) // PAGE) * PAGE if ring else 4096
    return {"capacity": capacity, "dtype": "float16", "head_dim": d, "kv_heads": hkv,
            "page_size": PAGE, "pages": capacity // PAGE, "pages_per_seq": capacity // PAGE,
            "ring": ring, "sinks": sinks, "window": window}


def attention_spec(config: str, rows=None):
    """The config's qkv_attention over a chunk of `rows` (default: symbolic) tokens."""
    from mlcc.backends.plan import KernelSpec
    from mlcc.ir.types import Sym

    hq, hkv, d, _, _ = CONFIGS[config]
    rows = Sym("seq_len") if rows is None else rows
    return KernelSpec(
        "qkv_attention", (((rows, (hq + 2 * hkv) * d), "float16"),), (((rows, hq * d),
                                                                        "float16"),),
        (("batched", False), ("num_q_heads", hq), ("rope_scaling", None),
         ("rope_style", "rotate_half"), ("rope_theta", 10000.0), ("rotary_dim", d),
         ("scale", None)), tuple(sorted(kv_layout(config).items())))


def baseline_generator(folder: Path):
    """gen_qkv_attention of commit BASELINE, loaded from `git show` as its own module."""
    return module_at(BASELINE, "mlcc/backends/cuda/attention.py", folder).gen_qkv_attention


def build(folder: Path) -> None:
    from mlcc.backends.cuda.attention import gen_qkv_attention
    from mlcc.backends.cuda.codegen import compile_library
    from mlcc.backends.cuda.decode_attention import gen_decode_attention
    from mlcc.backends.llvm.fallback import inv_freq_table

    baseline = baseline_generator(folder)
    kernels, tables = [], {}
    for config in CONFIGS:
        spec = attention_spec(config)
        kernels.append(gen_qkv_attention(spec, f"{config}_flash", flash=True, ldmatrix=True))
        kernels.append(gen_qkv_attention(spec, f"{config}_flash_plain", flash=True,
                                         ldmatrix=False))
        kernels.append(gen_qkv_attention(spec, f"{config}_flash_desc", flash=True,
                                         balance=False))
        kernels.append(baseline(spec, f"{config}_flash_base", flash=True, ldmatrix=True))
        kernels.append(gen_qkv_attention(spec, f"{config}_cuda_cores", flash=False))
        kernels += knob_kernels(spec, config)
        one = attention_spec(config, rows=1)
        kernels.append(gen_decode_attention(one, f"{config}_decode"))
        for variant, knobs in DECODE_SHAPES.items():
            kernels.append(gen_decode_attention(one, f"{config}_{variant}", **knobs))
        kernels.append(gen_qkv_attention(one, f"{config}_decode_two", flash=False))
        tables[config] = inv_freq_table(spec).astype(np.float32).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    compile_library(kernels, "", "", folder / "attention_bench.so")
    doc = {"configs": {c: {"shape": CONFIGS[c], "kv": kv_layout(c), "inv_freq": tables[c]}
                       for c in CONFIGS}, "cases": CASES, "decode_cases": DECODE_CASES}
    (folder / "cases.json").write_text(json.dumps(doc, indent=1))
    print(f"built {len(kernels)} launchers in {time.perf_counter() - start:.1f} s")


def knob_kernels(spec, config: str) -> list:
    """The shipped prefill kernel under each KNOB_VARIANTS setting of the flash.py knobs (the
    module's values are restored afterwards)."""
    from mlcc.backends.cuda import flash
    from mlcc.backends.cuda.attention import gen_qkv_attention

    saved, kernels = (flash.QUERY_TILE, flash.EXP2, flash.PAIRED), []
    try:
        for variant, knobs in KNOB_VARIANTS.items():
            flash.QUERY_TILE, flash.EXP2, flash.PAIRED = knobs
            kernels.append(gen_qkv_attention(spec, f"{config}_{variant}", flash=True))
    finally:
        flash.QUERY_TILE, flash.EXP2, flash.PAIRED = saved
    return kernels


def rotate(x: np.ndarray, pos: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Rotary embedding (rotate_half) of float16 rows (n, heads, d) in float32, rounded to
    float16 as the kernels round it."""
    half = inv.size
    angle = pos.astype(np.float32)[:, None] * inv[None, :]  # (n, d/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x = x.astype(np.float32)
    lo, hi = x[..., :half], x[..., half:]
    return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], -1).astype(np.float16)


def slot_of(p: np.ndarray, kv: dict) -> np.ndarray:
    if not kv["ring"]:
        return p
    sinks = kv["sinks"]
    return np.where(p < sinks, p, sinks + (p - sinks) % (kv["capacity"] - sinks))


def visible(pos: np.ndarray, keys: np.ndarray, kv: dict) -> np.ndarray:
    """(queries, keys): causal; with a window, the last `window` positions and the sinks."""
    ok = keys[None, :] <= pos[:, None]
    if kv["window"] > 0:
        ok &= (keys[None, :] >= pos[:, None] - kv["window"] + 1) | (keys[None, :] < kv["sinks"])
    return ok


def make_inputs(rng: np.random.Generator, config: dict, start: int, n: int) -> dict:
    hq, hkv, d, _, _ = config["shape"]
    kv = config["kv"]
    pages = kv["pages"]
    return {"qkv": rng.standard_normal((n, (hq + 2 * hkv) * d)).astype(np.float16),
            "pool": rng.standard_normal((pages, 2, hkv, PAGE, d)).astype(np.float16),
            "page_table": rng.permutation(pages).astype(np.int32),
            "seq_info": np.array([start, 0], np.int32)}


def gather(pool: np.ndarray, table: np.ndarray, positions: np.ndarray, kv: dict) -> np.ndarray:
    """(2, kv heads, positions, d) keys and values of `positions` read through the pages."""
    slots = slot_of(positions, kv)
    rows = pool[table[slots // PAGE], :, :, slots % PAGE, :]  # (positions, 2, kv heads, d)
    return rows.transpose(1, 2, 0, 3)


def check(torch, config: dict, inputs: dict, y: np.ndarray, pool: np.ndarray, start: int,
          device: str = "cuda") -> dict:
    """Errors of the appended cache rows and of the output against float32 references."""
    hq, hkv, d, _, _ = config["shape"]
    kv, inv = config["kv"], np.asarray(config["inv_freq"], np.float32)
    qkv = inputs["qkv"]
    n = qkv.shape[0]
    pos = np.arange(start, start + n)
    heads = qkv.reshape(n, hq + 2 * hkv, d)
    chunk = gather(pool, inputs["page_table"], pos, kv)
    k_err = np.abs(chunk[0].astype(np.float32) -
                   rotate(heads[:, hq:hq + hkv], pos, inv).transpose(1, 0, 2)).max()
    v_err = np.abs(chunk[1].astype(np.float32) - heads[:, hq + hkv:].transpose(1, 0, 2)).max()
    keys = np.arange(start + n)
    cache = torch.from_numpy(gather(pool, inputs["page_table"], keys, kv).astype(np.float32))
    q = torch.from_numpy(rotate(heads[:, :hq], pos, inv).astype(np.float32).transpose(1, 0, 2))
    cache, q = cache.to(device), q.to(device)
    group = hq // hkv
    k, v = cache[0].repeat_interleave(group, 0), cache[1].repeat_interleave(group, 0)
    mask = torch.from_numpy(visible(pos, keys, kv)).to(device)
    scores = (q @ k.transpose(1, 2)) / np.sqrt(d)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    expected = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(n, hq * d).cpu().numpy()
    pairs = int(visible(pos, keys, kv).sum())
    return {"k_err": float(k_err), "v_err": float(v_err),
            "y_err": float(np.abs(y.astype(np.float32) - expected).max()),
            "gflop": 4.0 * pairs * d * hq / 1e9}


def validate(torch, tvm, lib, dev, doc: dict, case: list, variants=VARIANTS,
             reference_device: str = "cuda") -> list[dict]:
    """One row per variant: errors against the references and the call's arguments."""
    name, config_name, start, n = case
    config = doc["configs"][config_name]
    inputs = make_inputs(np.random.default_rng(start + n), config, start, n)
    hq, _, d, _, _ = config["shape"]
    rows = []
    for variant in variants:
        f = lib[f"{config_name}_{variant}"]
        args = [tvm.runtime.tensor(inputs[key], dev)
                for key in ("qkv", "seq_info", "page_table", "pool")]
        y = tvm.runtime.empty((n, hq * d), "float16", dev)
        call = (args[0], y, args[1], args[2], args[3])
        f(*call)
        row = {"case": name, "variant": variant, "start": start, "tokens": n,
               **check(torch, config, inputs, y.numpy(), args[3].numpy(), start,
                       reference_device)}
        row["ok"] = max(row["k_err"], row["v_err"], row["y_err"]) < TOLERANCE
        rows.append({**row, "function": f, "call": call})
    return rows


def run(folder: Path, out: Path) -> None:
    import torch
    import tvm

    from mlcc.runtime_check.compiled import _device

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = _device("cuda")
    lib = tvm.runtime.load_module(str(folder / "attention_bench.so"))
    doc = json.loads((folder / "cases.json").read_text())
    results = []
    for case in doc["cases"]:
        for row in validate(torch, tvm, lib, dev, doc, case):
            f, call = row.pop("function"), row.pop("call")
            if row["ok"]:
                row["us"] = time_calls(torch, f, call)
                row["tflop_s"] = row["gflop"] / (row["us"] * 1e-6) / 1e3
            results.append(row)
            print(f"{row['case']:38s} {row['variant']:14s} y_err {row['y_err']:.1e} "
                  f"k_err {row['k_err']:.1e} "
                  + (f"{row['us']:9.1f} us {row['tflop_s']:6.1f} TFLOP/s" if row["ok"]
                     else "FAILED"))
    for name, config, position in doc.get("decode_cases", []):
        pools = None  # LAYERS copies of the case's pool, shared by its variants
        for row in validate(torch, tvm, lib, dev, doc, [name, config, position, 1],
                            DECODE_VARIANTS):
            f, call = row.pop("function"), row.pop("call")
            if row["ok"]:
                pools = pools or [tvm.runtime.tensor(call[4].numpy(), dev)
                                  for _ in range(LAYERS)]
                row["us"] = time_layers(torch, f, call, pools)
            results.append(row)
            print(f"{row['case']:38s} {row['variant']:14s} y_err {row['y_err']:.1e} "
                  f"k_err {row['k_err']:.1e} "
                  + (f"{row['us']:9.2f} us per layer" if row["ok"] else "FAILED"))
    doc = {"device": torch.cuda.get_device_name(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python " + " ".join(sys.argv), "tolerance": TOLERANCE,
           "results": results}
    out.write_text(json.dumps(doc, indent=1))


def time_calls(torch, f, call, calls: int = 20, repeats: int = 7) -> float:
    """Median microseconds per call of `calls` calls replayed as one CUDA graph."""
    return replay_us(torch, lambda i: f(*call), calls, warm=1, repeats=repeats)


def time_layers(torch, f, call, pools: list, repeats: int = 7) -> float:
    """Median microseconds per call, call i on pools[i] (as each layer of a decode step reads
    its own part of the cache), one graph of one call per pool."""
    return replay_us(torch, lambda i: f(*call[:4], pools[i % len(pools)]), len(pools), warm=1,
                     repeats=repeats)

if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
