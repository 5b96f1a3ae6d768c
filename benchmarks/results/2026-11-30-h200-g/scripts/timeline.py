"""Summaries of the decode attention's phase timelines (build_timeline.py's TL lines):

    python timeline.py LOG[.gz] ...

For each position printed (lines grouped by start time), the median over blocks of each phase
(clock64 cycles shown as ns at 1.98 GHz, the H200's highest SM clock) and, per launch (one
layer), the spread of the blocks' starts and the %globaltimer spans from the first block's
start to the first wait's return and from there to the last block's exit (medians over the
32 layers).
"""
import gzip
import sys

import numpy as np

GHZ = 1.98
for path in sys.argv[1:]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = [line.split()[1:] for line in f if line.startswith("TL ")]
    a = np.array(rows, dtype=np.int64)
    a = a[np.argsort(a[:, 9])]
    print(f"{path}: {len(a)} blocks")
    print("| set | blocks | splits | start>wait | wait>staged | staged>walked | walked>exit |"
          " start spread | first start>first wait | first wait>last exit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, part in enumerate(np.split(a, np.where(np.diff(a[:, 9]) > 50_000_000)[0] + 1)):
        phases = np.median(part[:, 5:9], axis=0) / GHZ
        launches = np.split(part, np.where(np.diff(part[:, 9]) > 3000)[0] + 1)
        spans = np.median([[p[:, 9].max() - p[:, 9].min(), p[:, 10].min() - p[:, 9].min(),
                            p[:, 11].max() - p[:, 10].min()] for p in launches], axis=0)
        cells = " | ".join(f"{v:.0f}" for v in list(phases) + list(spans))
        print(f"| {n} | {len(part)} | {int(np.median(part[:, 4]))} | {cells} |")
