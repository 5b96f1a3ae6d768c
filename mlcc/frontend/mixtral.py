"""Mixtral (HF model_type "mixtral"): config, HF weight mapping and IR builder.

A Mistral/Llama decoder whose MLP is a sparse mixture of experts: a router (a linear layer
without bias, kept unquantized in every mode because its logits pick the experts) scores the
experts per token, the `num_experts_per_tok` best are kept and weighted by a softmax over their
logits, and each chosen expert (a SwiGLU MLP, w1 = gate, w3 = up, w2 = down) adds its output
times its weight.

In the IR every expert is an ordinary pair of linear layers, so quantization and the NumPy
interpreter treat experts like any MLP; `moe_route` gives the dense weights (0 for experts not
chosen) and `moe_combine` adds the weighted outputs, skipping experts of weight 0. This dense
form is the model's definition; the compiler's `sparse_moe` pass (mlcc/passes/moe.py) turns it
into grouped linears over the routed rows only, and the experts stay separate parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

from mlcc import ir
from mlcc.frontend.architecture import ParamSource, WeightMapping, fused_param, linear_param
from mlcc.frontend.config import HFConfigReader, _fail
from mlcc.frontend.decoder import (
    DecoderStyle,
    build_decoder,
    decoder_architecture,
    decoder_weight_mapping,
)
from mlcc.frontend.llama import LlamaConfig, llama_style


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(LlamaConfig):
    """Llama fields, a sliding window (null or absent: none) and the experts."""

    num_local_experts: int
    num_experts_per_tok: int = 2

    model_type: ClassVar[str] = "mixtral"
    hf_sliding_window_key: ClassVar[str] = "sliding_window"

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        return {**super()._hf_fields(r), "num_local_experts": r.int("num_local_experts"),
                "num_experts_per_tok": r.int("num_experts_per_tok", 2)}

    def validate(self) -> None:
        super().validate()
        if self.attention_bias or self.mlp_bias:
            raise _fail(f"attention_bias={self.attention_bias}, mlp_bias={self.mlp_bias}: "
                        "mixtral has no biases; fix config.json")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise _fail(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, "
                        f"num_local_experts={self.num_local_experts}]; fix config.json")


def _moe_params(config: MixtralConfig, layer: int) -> list[ParamSource]:
    """The router and the experts of `model.layers.{layer}.block_sparse_moe`, in load order."""
    moe = f"model.layers.{layer}.block_sparse_moe."
    hidden, inter = config.hidden_size, config.intermediate_size
    # kind "other": the router is never quantized.
    params = [ParamSource(moe + "gate.weight", (config.num_local_experts, hidden),
                          (moe + "gate.weight",), "identity", "other")]
    for e in range(config.num_local_experts):
        expert = f"{moe}experts.{e}."
        gate_up = ((expert + "w1.weight", inter), (expert + "w3.weight", inter))
        params += [fused_param(expert + "gate_up_proj.weight", gate_up, (hidden,), "linear"),
                   linear_param(expert + "w2.weight", hidden, inter)]
    return params


def _sparse_moe(config: MixtralConfig, b: ir.FunctionBuilder, w: dict[str, ir.Value],
                layer: int, h: ir.Value) -> ir.Value:
    moe = f"model.layers.{layer}.block_sparse_moe."
    weights = b.emit("moe_route", b.linear(h, w[moe + "gate.weight"]),
                     top_k=config.num_experts_per_tok)  # f32[n, experts]
    outs = []
    for e in range(config.num_local_experts):
        expert = f"{moe}experts.{e}."
        gate_up = b.linear(h, w[expert + "gate_up_proj.weight"])
        outs.append(b.linear(b.silu_mul(gate_up), w[expert + "w2.weight"]))
    return b.emit("moe_combine", weights, *outs)


def mixtral_style(config: MixtralConfig) -> DecoderStyle:
    """Llama's decoder with the sparse experts (`block_sparse_moe`) as its MLP."""
    return dataclasses.replace(llama_style(config),
                               custom_mlp_params=functools.partial(_moe_params, config),
                               custom_mlp=functools.partial(_sparse_moe, config))


def mixtral_weight_mapping(config: MixtralConfig) -> WeightMapping:
    """mlcc parameters of a Mixtral model in load order, from the checkpoints' names
    (`block_sparse_moe.experts.E.w1/w2/w3`, also what transformers' save_pretrained writes)."""
    return decoder_weight_mapping(config, mixtral_style(config))


def build_mixtral(config: MixtralConfig) -> ir.Module:
    """The IR of a Mixtral model: one function per entry of `entry_points` (prefill, decode,
    batch_decode when max_batch_size > 1), each returning logits."""
    return build_decoder(config, mixtral_style(config))


ARCHITECTURE = decoder_architecture("mixtral", MixtralConfig, mixtral_style)
