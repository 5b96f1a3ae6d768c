# Build machine: runtime site, the tiny TP cases and the 7B libraries for 1 and 2 shards only
# (tp_run.py prepare builds the 13B pair for 4 GPUs too).
python - <<'PY'
import sys
sys.path.insert(0, 'benchmarks/cuda')
import tp_run
tp_run.MODEL_FOR_GPUS = {2: 'llama2_7b'}
sys.argv = ['tp_run.py', 'prepare']
tp_run.main()
PY
