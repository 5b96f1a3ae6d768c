# Call 7: the default TMA GEMV configuration at the one-row shapes of other presets (Mistral-7B
# GQA qkv, Llama-2-7B on 2 shards, Llama-2-13B o_proj, phi-2), each checked against a float32
# reference and timed beside the database's pick (gemv_sweep.py build ... tma_shapes).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 150 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tma_shapes \
  "$OUT/gemv_tma_shapes.json" > "$OUT/gemv_tma_shapes.log" 2>&1
grep -v Warn "$OUT/gemv_tma_shapes.log" | tail -12
