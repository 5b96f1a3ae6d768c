"""The step timeline of build_gemv_timeline.py's lines (TG: qkv, o_proj, down; TA: attention):

    python step_timeline.py LOG[.gz]

Per layer (a launch of each kernel), times in us from the layer's qkv first block start: each
kernel's first and last block start, its first and median wait return, median staged, the
median landing of each chunk (GEMVs), the median and last end. Then the medians over layers.
"""
import collections
import gzip
import sys

import numpy as np

NAMES = {("12288", "4096"): "qkv", ("4096", "4096"): "o_proj", ("4096", "11008"): "down",
         ("0", "0"): "attention"}
rows = collections.defaultdict(list)
opener = gzip.open if sys.argv[1].endswith(".gz") else open
for line in opener(sys.argv[1], "rt"):
    if line.startswith(("TG ", "TA ")):
        f = line.split()
        rows[(NAMES[(f[1], f[2])], int(f[3]))].append([int(v) for v in f[5:]])
launches = sorted({n for _, n in rows})
cols = ["first start", "last start", "first wait", "median wait", "median staged",
        "chunks landed (median)", "median end", "last end"]
table = collections.defaultdict(list)
for n in launches:
    base = np.array(rows[("qkv", n)])[:, 0].min()
    for kernel in ("qkv", "attention", "o_proj", "down"):
        a = np.array(rows[(kernel, n)], dtype=np.float64)
        a[a == 0] = np.nan
        a = (a - base) / 1000.0
        if kernel == "attention":
            chunks = [np.nanmedian(a[:, 3])]  # walked
            end = a[:, 13] if a.shape[1] > 13 else a[:, -1]
        else:
            chunks = [np.nanmedian(a[:, 3 + c]) for c in range(8) if not np.isnan(a[:, 3 + c]).all()]
            end = a[:, -1]
        table[kernel].append([np.nanmin(a[:, 0]), np.nanmax(a[:, 0]), np.nanmin(a[:, 1]),
                              np.nanmedian(a[:, 1]), np.nanmedian(a[:, 2])] + chunks
                             + [np.nanmedian(end), np.nanmax(end)])
print("| kernel | blocks | first start | last start | first wait | median wait | median staged |"
      " chunks landed / walked (median) | median end | last end |")
print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
for kernel in ("qkv", "attention", "o_proj", "down"):
    m = np.median(np.array(table[kernel]), axis=0)
    blocks = len(rows[(kernel, launches[0])])
    mid = ", ".join(f"{v:.2f}" for v in m[5:-2])
    print(f"| {kernel} | {blocks} | " + " | ".join(f"{v:.2f}" for v in m[:5])
          + f" | {mid} | {m[-2]:.2f} | {m[-1]:.2f} |")
layer = [np.array(rows[("qkv", n)])[:, 0].min() for n in launches]
print(f"\nlayer period (qkv first start to the next's), median: "
      f"{np.median(np.diff(layer)) / 1000:.2f} us over {len(layer) - 1} layers")
