"""7B library with chosen decode GEMV shapes on the persistent kernel (experiment; patches the
tuning database in memory). argv: output.so N,K[:blocks:warps:rows] ..."""
import copy, sys, time
from pathlib import Path
from mlcc.backends.cuda import tuning
db = tuning._database()
for item in sys.argv[2:]:
    key, *launch = item.split(":")
    record = copy.deepcopy(db["best_by_kind"]["persistent"][key])
    record["dot"] = "mlcc_q4_dp2a"
    if launch:
        record["blocks_per_sm"], record["warps"], record["rows_per_warp"] = map(int, launch)
    record["kind"] = "persistent"
    db["best"][key] = record
    db["best_by_kind"]["persistent"][key] = record
    print("persistent:", key, {k: record[k] for k in ("blocks_per_sm", "warps", "rows_per_warp", "dot")})
from mlcc.interface.compile import compile_model
t = time.time()
compile_model('llama2_7b', Path(sys.argv[1]), quantization='q4f16_1', device='cuda', opt='O2', overrides='max_batch_size=16')
print(f"built in {time.time() - t:.1f} s")
