"""Passes over the IR: legalization, fusion, KV-cache layout, chunking, memory planning."""

from mlcc.passes.base import Pass, PipelineResult, run_passes
from mlcc.passes.pipeline import KNOBS, OptConfig, build_pipeline, parse_opt

__all__ = ["KNOBS", "OptConfig", "Pass", "PipelineResult", "build_pipeline", "parse_opt",
           "run_passes"]
