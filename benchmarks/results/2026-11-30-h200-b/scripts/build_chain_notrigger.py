"""The 7B library with the decode chain that never releases the next kernel early (timing
variant): argv[1] the library to write."""
import sys
from pathlib import Path

from mlcc.backends.cuda import chain
from mlcc.interface.compile import compile_model

TRIGGER = "if (nb == (int)gridDim.x) mlcc_grid_launch();"
original = chain.gen_decode_chain


def patched(spec, name):
    kernel = original(spec, name)
    assert TRIGGER in kernel.device_source
    return chain.CudaKernel(kernel.name, kernel.device_source.replace(TRIGGER, ""),
                            kernel.launcher, kernel.self_waiting, kernel.min_blocks)


chain.gen_decode_chain = patched
chain.GENERATORS[chain.OP] = patched
from mlcc.backends.cuda import codegen

codegen.GENERATORS[chain.OP] = patched
compile_model("llama2_7b", Path(sys.argv[1]), quantization="q4f16_1", device="cuda",
              opt="O2;decode_chain=1", overrides="max_batch_size=16")
