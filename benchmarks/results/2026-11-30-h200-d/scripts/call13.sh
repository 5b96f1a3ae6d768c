# Call 13: the GLU mode at its default depth on other presets' gate_up shapes (Mistral-7B and
# Llama-3.1-8B 28672 x 4096, Qwen2-1.5B 17920 x 1536), checked against a float32 reference and
# timed beside their GLU GEMV (gemv_sweep.py build ... tma_glu_shapes).
. benchmarks/results/2026-11-30-h200/scripts/env.sh
timeout 120 python3 benchmarks/cuda/gemv_sweep.py run .device/sweep_tma_glu_shapes \
  "$OUT/gemv_tma_glu_shapes.json" > "$OUT/gemv_tma_glu_shapes.log" 2>&1
grep -v Warn "$OUT/gemv_tma_glu_shapes.log" | tail -6
