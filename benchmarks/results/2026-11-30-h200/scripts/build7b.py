import sys, time
from pathlib import Path
from mlcc.interface.compile import compile_model
t=time.time()
compile_model('llama2_7b', Path(sys.argv[1]), quantization='q4f16_1', device='cuda', opt=(sys.argv[2] if len(sys.argv) > 2 else 'O2'), overrides='max_batch_size=16')
print(f"built {sys.argv[1]} in {time.time()-t:.1f} s")
