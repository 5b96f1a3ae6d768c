"""What an architecture provides: its config class, its HF weight mapping and its IR builder.

A `WeightMapping` lists every mlcc parameter in load order with the HF tensors it is made of and
how they combine, plus the HF tensors a checkpoint may hold that the model ignores on purpose. It
is the single statement of "which parameters exist" that convert_weight, quantization and the
compiled library's metadata all follow.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlcc.frontend.config import ModelConfig

Combine = Literal["identity", "concat0", "neox_qkv", "transpose"]
ParamKind = Literal["linear", "embedding", "norm", "bias", "other"]

COMBINE_KINDS = ("identity", "concat0", "neox_qkv", "transpose")
PARAM_KINDS = ("linear", "embedding", "norm", "bias", "other")


@dataclass(frozen=True)
class ParamSource:
    """One mlcc parameter and the HF tensors it is built from.

    combine says how `hf_names` (with shapes `hf_shapes`) become `shape`:
    - "identity": one tensor, taken as it is (`hf_shapes` defaults to `(shape,)`);
    - "concat0": tensors stacked along dim 0 in the listed order (q, k, v or gate, up);
    - "neox_qkv": one GPT-NeoX `query_key_value` tensor whose rows are per-head interleaved
      [q_h, k_h, v_h] for each of `heads` heads; it is regrouped to all q rows, then all k rows,
      then all v rows, which is the layout of our `qkv_proj` (the same for its bias);
    - "transpose": one 2-D tensor stored (in_features, out_features), as GPT-2's Conv1D layers
      store their weights; it is transposed to `shape` (`hf_shapes` defaults to it reversed).
    """

    name: str
    shape: tuple[int, ...]
    hf_names: tuple[str, ...]
    combine: Combine = "identity"
    kind: ParamKind = "other"
    hf_shapes: tuple[tuple[int, ...], ...] = ()
    heads: int = 0

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_KINDS:
            raise ValueError(f"{self.name}: combine {self.combine!r} not in {COMBINE_KINDS}")
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} not in {PARAM_KINDS}")
        if self.combine != "concat0" and len(self.hf_names) != 1:
            raise ValueError(f"{self.name}: combine {self.combine!r} takes exactly one HF tensor")
        if not self.hf_shapes and self.combine != "concat0":
            stored = self.shape[::-1] if self.combine == "transpose" else self.shape
            object.__setattr__(self, "hf_shapes", (tuple(stored),))
        if len(self.hf_names) != len(self.hf_shapes) or not self.hf_names:
            raise ValueError(f"{self.name}: hf_names and hf_shapes must be non-empty, same length")
        if self.combine == "neox_qkv" and self.heads <= 0:
            raise ValueError(f"{self.name}: combine 'neox_qkv' needs the head count in `heads`")


@dataclass(frozen=True)
class WeightMapping:
    """All parameters of a model in load order, and regexes of HF tensors ignored on purpose.

    `hf_prefix` is a prefix that checkpoints of the model write before their tensor names or
    leave out, depending on the class that saved them (GPT2LMHeadModel writes
    `transformer.h.0...`, GPT2Model and the published GPT-2 folders `h.0...`); a tensor is
    found under either spelling.
    """

    params: tuple[ParamSource, ...]
    unused: tuple[str, ...] = ()
    hf_prefix: str = ""

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError("WeightMapping: parameter names must be unique")

    def param(self, name: str) -> ParamSource:
        """The parameter called `name` (KeyError if the model has none)."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def hf_names(self) -> dict[str, ParamSource]:
        """Every HF tensor the model reads, mapped to the parameter that uses it."""
        return {hf: p for p in self.params for hf in p.hf_names}

    def is_unused(self, hf_name: str) -> bool:
        """True when `hf_name` is an HF tensor this model deliberately ignores."""
        spellings = (hf_name, self._other_spelling(hf_name)) if self.hf_prefix else (hf_name,)
        return any(re.fullmatch(pattern, name) for pattern in self.unused for name in spellings)

    def spelled_as(self, stored: Iterable[str]) -> WeightMapping:
        """This mapping with every HF name that a checkpoint holding `stored` spells with or
        without `hf_prefix` renamed to its spelling (parameter names stay)."""
        if not self.hf_prefix:
            return self
        stored = set(stored)

        def spelled(hf: str) -> str:
            other = self._other_spelling(hf)
            return other if hf not in stored and other in stored else hf

        params = tuple(dataclasses.replace(p, hf_names=tuple(spelled(hf) for hf in p.hf_names))
                       for p in self.params)
        return dataclasses.replace(self, params=params)

    def _other_spelling(self, hf_name: str) -> str:
        if hf_name.startswith(self.hf_prefix):
            return hf_name.removeprefix(self.hf_prefix)
        return self.hf_prefix + hf_name


@dataclass(frozen=True)
class Architecture:
    """One supported model family, keyed by the HF `model_type`."""

    name: str
    config_cls: type[ModelConfig]
    weight_mapping: Callable[[ModelConfig], WeightMapping]
    build_module: Callable[[ModelConfig], object]


def styled_architecture(name: str, config_cls: type[ModelConfig],
                        style: Callable[[Any], Any],
                        weight_mapping: Callable[[Any, Any], WeightMapping],
                        build_module: Callable[[Any, Any], object]) -> Architecture:
    """An architecture whose mapping and IR are shared builders, `weight_mapping(config, s)`
    and `build_module(config, s)`, applied to the style `s = style(config)` that states what
    the family's members do differently."""
    return Architecture(name=name, config_cls=config_cls,
                        weight_mapping=partial(_with_style, weight_mapping, style),
                        build_module=partial(_with_style, build_module, style))


def _with_style(build: Callable[[Any, Any], Any], style: Callable[[Any], Any],
                config: ModelConfig) -> Any:
    return build(config, style(config))


def linear_param(name: str, out_features: int, in_features: int) -> ParamSource:
    """A linear weight stored as in HF: (out_features, in_features)."""
    shape = (out_features, in_features)
    return ParamSource(name, shape, (name,), "identity", "linear")


def fused_param(
    name: str, parts: tuple[tuple[str, int], ...], trailing: tuple[int, ...], kind: ParamKind
) -> ParamSource:
    """A weight (trailing=(in_features,)) or bias (trailing=()) made by stacking HF tensors
    `parts` = ((hf_name, rows), ...) along dim 0 in order."""
    hf_shapes = tuple((rows, *trailing) for _, rows in parts)
    total = sum(rows for _, rows in parts)
    hf_names = tuple(hf for hf, _ in parts)
    return ParamSource(name, (total, *trailing), hf_names, "concat0", kind, hf_shapes)


def vector_param(name: str, size: int, kind: ParamKind) -> ParamSource:
    """A 1-D parameter (a norm weight or a bias) taken as it is."""
    return ParamSource(name, (size,), (name,), "identity", kind)
