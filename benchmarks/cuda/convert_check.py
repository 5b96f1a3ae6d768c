"""Issue 4's check: `convert_weight --device cuda` writes the same bytes as on the CPU.

For every quantization mode that converts an HF checkpoint (AWQ needs a pre-quantized AWQ
checkpoint and is left out), convert stories260K once on the CPU and once on the GPU and compare
the md5 of every shard and the ndarray-cache.json.

    python benchmarks/cuda/convert_check.py MODEL_DIR WORK_DIR OUT.md
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from mlcc.interface.convert_weight import convert_weight
from mlcc.quant import SCHEMES


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix in (".bin", ".json")}


def main() -> None:
    model, work, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    import torch

    lines = [(f"# convert_weight --device cuda vs cpu on stories260K "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"), "",
             f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| quantization | files | identical | md5 of params_shard_0.bin (cpu / cuda) |",
             "|---|---|---|---|"]
    failures = 0
    for name, scheme in SCHEMES.items():
        if scheme.kind == "awq":
            lines.append(f"| {name} | - | not run (needs an AWQ checkpoint) | |")
            continue
        found = {}
        for device in ("cpu", "cuda"):
            folder = work / f"{name}-{device}"
            convert_weight(model, name, folder, device=device, overwrite=True, progress=False)
            found[device] = digests(folder)
        same = found["cpu"] == found["cuda"]
        failures += not same
        shard = "params_shard_0.bin"
        lines.append(f"| {name} | {len(found['cpu'])} | {'yes' if same else 'NO'} | "
                     f"{found['cpu'].get(shard, '')} / {found['cuda'].get(shard, '')} |")
    lines += ["", f"Result: {'all identical' if not failures else f'{failures} mode(s) differ'}."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
