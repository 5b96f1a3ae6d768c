#!/usr/bin/env bash
# The main job on the bundled model: install, then HF folder -> convert_weight -> gen_config ->
# compile (CPU) -> one chat turn. Run from the repository root; ../shared/models holds the model.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-../shared/models/stories260K}
OUT=${OUT:-dist/stories260K-q4f16_1}

[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e .

mlcc convert_weight "$MODEL" --quantization q4f16_1 -o "$OUT/params" --overwrite
mlcc gen_config "$MODEL" --quantization q4f16_1 --conv-template LM -o "$OUT/params"
mlcc compile "$OUT/params/mlc-chat-config.json" --device cpu -o "$OUT/lib.so"
mlcc chat "$OUT/params" --model-lib-path "$OUT/lib.so" --prompt "Once upon a time"
mlcc bench "$OUT/params" --model-lib-path "$OUT/lib.so" --prompt "Once upon a time" --generate-length 64
