"""mlcc's benchmark harness: compile a model at several optimization levels and measure it.

`python -m benchmarks run` converts the weights once, compiles each level, checks that every
level computes what the IR interpreter computes, then measures prefill and decode throughput,
time to first token, peak memory and per-token host overhead with the TVM runtime, next to HF
transformers on the same weights. Results land in benchmarks/results/<date>-<device>/ as a
markdown table, PNG plots and the raw numbers in JSON. The harness measures; it never asserts
a speed.
"""
