"""Model configs: the fields every architecture shares, read from HF config.json and validated.

`ModelConfig` is a frozen dataclass. Each architecture extends it with its own fields and a
`_hf_fields` hook that reads them from config.json; validation runs in `__post_init__`, so a
config made by `from_hf`, `from_json` or `with_overrides` is always checked the same way.
Every failure is an `MlccError("config", ...)` naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from mlcc.errors import MlccError

STAGE = "config"
MAX_DEFAULT_PREFILL_CHUNK = 2048
_MISSING = object()

C = TypeVar("C", bound="ModelConfig")


def _fail(message: str) -> MlccError:
    return MlccError(STAGE, message)


def _type_name(value: Any) -> str:
    return type(value).__name__


class HFConfigReader:
    """Typed access to an HF config.json dict; errors name the key, the value and the fix."""

    def __init__(self, hf_config: dict, origin: str = "config.json") -> None:
        if not isinstance(hf_config, dict):
            raise _fail(f"{origin}: expected a JSON object, got {_type_name(hf_config)}")
        self.hf = hf_config
        self.origin = origin

    def has(self, key: str) -> bool:
        return key in self.hf

    def _get(self, key: str, default: Any) -> Any:
        if key in self.hf:
            return self.hf[key]
        if default is _MISSING:
            raise _fail(f"{self.origin}: missing required key '{key}'; add it to config.json")
        return default

    def _bad(self, key: str, value: Any, wanted: str) -> MlccError:
        return _fail(
            f"{self.origin}: '{key}' must be {wanted}, got {value!r} ({_type_name(value)}); "
            "fix the value in config.json"
        )

    def int(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.hf and default is not _MISSING:
            return default
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, value, "an integer")
        return value

    def float(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.hf and default is not _MISSING:
            return default
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, value, "a number")
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.hf and default is not _MISSING:
            return default
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def str(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.hf and default is not _MISSING:
            return default
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def opt_int(self, key: str) -> int | None:
        """An integer that may be absent or null."""
        return None if self.hf.get(key) is None else self.int(key)

    def token_ids(self, key: str, default: Any) -> int | tuple[int, ...] | None:
        """A token id, a list of token ids, or null."""
        value = self._get(key, default)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return value[0] if len(value) == 1 else tuple(value)
        raise self._bad(key, value, "a token id or a non-empty list of token ids")

    def rope_parameters(self) -> dict:
        """transformers 5 writes rope settings as one `rope_parameters` object."""
        value = self.hf.get("rope_parameters")
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad("rope_parameters", value, "an object")
        return value

    def rope_theta(self, key: str = "rope_theta") -> float:
        """The rotary base: `key` at the top level, else `rope_parameters.rope_theta`."""
        theta = self.float(key, None)
        return float(self.rope_parameters().get("rope_theta", 10000.0)) if theta is None else theta

    def check_unscaled_rope(self, model_type: str) -> None:
        """Refuse rotary frequency scaling (`rope_scaling` or `rope_parameters`) for a model
        that implements only the unscaled form."""
        rope = self.hf.get("rope_scaling") or self.rope_parameters()
        kind = None
        if isinstance(rope, dict):
            kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default"):
            raise _fail(f"{self.origin}: rope scaling {kind!r} is not supported for {model_type}; "
                        "only unscaled rotary embeddings are")

    def decoder_sizes(self, head_dim: int | None = None,
                      fix: str = "fix num_attention_heads") -> dict:
        """The sizes that Llama-family configs state under the same keys; `head_dim` None means
        hidden_size / num_attention_heads, which must then divide (`fix` says how to mend it)."""
        hidden, heads = self.int("hidden_size"), self.int("num_attention_heads")
        if head_dim is None:
            if heads <= 0 or hidden % heads:
                raise _fail(f"{self.origin}: num_attention_heads={heads} does not divide "
                            f"hidden_size={hidden}; {fix}")
            head_dim = hidden // heads
        return {
            "vocab_size": self.int("vocab_size"),
            "hidden_size": hidden,
            "num_hidden_layers": self.int("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.opt_int("num_key_value_heads") or heads,
            "head_dim": head_dim,
            "intermediate_size": self.int("intermediate_size"),
        }


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling. "linear": positions / factor; "llama3": Llama-3.1's smooth
    per-frequency interpolation between the unscaled and the factor-scaled frequencies."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    SUPPORTED: ClassVar[tuple[str, ...]] = ("linear", "llama3")

    def __post_init__(self) -> None:
        if self.rope_type not in self.SUPPORTED:
            raise _fail(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(self.SUPPORTED)}"
            )
        if not self.factor > 0:
            raise _fail(f"rope_scaling.factor={self.factor!r} must be > 0")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise _fail(
                f"rope_scaling: need high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )

    @classmethod
    def from_hf(cls, value: Any) -> RopeScaling | None:
        """Parse config.json's `rope_scaling` (or `rope_parameters`); None when unscaled."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _fail(f"config.json: 'rope_scaling' must be an object or null, got {value!r}")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type == "default":
            return None
        try:
            return cls(
                rope_type=rope_type,
                factor=float(value["factor"]),
                low_freq_factor=float(value.get("low_freq_factor", 1.0)),
                high_freq_factor=float(value.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    value.get("original_max_position_embeddings", 8192)
                ),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise _fail(f"config.json: rope_scaling {value!r} is malformed ({err!r})") from None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def rope_inv_freq(
    rotary_dim: int, theta: float, scaling: RopeScaling | None = None
) -> np.ndarray:
    """Inverse rotary frequencies (rotary_dim // 2,) as float64, with scaling applied.

    Pair i of a head (dims i and i + rotary_dim/2, the HF `rotate_half` layout) turns by
    position * inv_freq[i].
    """
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept; the band between is blended.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every architecture has; see design.md and the frontend contract for meanings."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    context_window_size: int
    sliding_window_size: int = -1
    attention_sink_size: int = 0
    prefill_chunk_size: int
    tensor_parallel_shards: int = 1
    max_batch_size: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    model_type: ClassVar[str] = ""
    # Keys holding the trained context length, first found wins (GPT-2 style: n_positions).
    context_keys: ClassVar[tuple[str, ...]] = (
        "max_position_embeddings",
        "max_sequence_length",
        "n_positions",
    )
    # The HF key of the sliding window ("" when the architecture has none; null means none)
    # and the window HF assumes when config.json lacks the key (-1: none).
    hf_sliding_window_key: ClassVar[str] = ""
    hf_sliding_window_default: ClassVar[int] = -1
    default_bos_token_id: ClassVar[int | None] = 1
    default_eos_token_id: ClassVar[int | None] = 2

    def __post_init__(self) -> None:
        self._check_types()
        self._check_common()
        self.validate()

    # ----- reading -----------------------------------------------------------------------

    @classmethod
    def from_hf(cls: type[C], hf_config: dict) -> C:
        """Read and validate an HF config.json dict."""
        reader = HFConfigReader(hf_config)
        model_type = hf_config.get("model_type")
        if cls.model_type and model_type not in (None, cls.model_type):
            raise _fail(
                f"config.json: model_type={model_type!r} cannot be read as {cls.model_type!r}; "
                "pass the matching --model-type"
            )
        fields = cls._hf_fields(reader)
        fields.update(cls._hf_windows(reader))
        fields.update(cls._hf_tokens(reader))
        return cls(**fields)

    @classmethod
    def _hf_fields(cls, r: HFConfigReader) -> dict:
        """Architecture-specific reading; returns constructor fields except windows and tokens."""
        raise NotImplementedError(f"{cls.__name__} must define _hf_fields")

    @classmethod
    def _hf_windows(cls, r: HFConfigReader) -> dict:
        # MLC-style configs may state context_window_size etc. directly; they win over HF keys.
        sliding = -1
        if r.has("sliding_window_size"):
            sliding = r.int("sliding_window_size")
        elif cls.hf_sliding_window_key and r.has(cls.hf_sliding_window_key):
            sliding = r.opt_int(cls.hf_sliding_window_key) or -1
        elif cls.hf_sliding_window_key:
            sliding = cls.hf_sliding_window_default
        if sliding > 0:
            context = -1  # the window bounds the KV cache; the trained length does not matter
        elif r.has("context_window_size"):
            context = r.int("context_window_size")
        else:
            context = cls._hf_context_length(r)
        sinks = r.int("attention_sink_size", 0)
        limit = sliding if context == -1 else context
        prefill = r.int("prefill_chunk_size", min(limit, MAX_DEFAULT_PREFILL_CHUNK))
        return {
            "context_window_size": context,
            "sliding_window_size": sliding,
            "attention_sink_size": sinks,
            "prefill_chunk_size": prefill,
            "tensor_parallel_shards": r.int("tensor_parallel_shards", 1),
            "max_batch_size": r.int("max_batch_size", 1),
        }

    @classmethod
    def _hf_context_length(cls, r: HFConfigReader) -> int:
        for key in cls.context_keys:
            if r.has(key):
                return r.int(key)
        raise _fail(
            f"config.json: none of {', '.join(cls.context_keys)} is set, so the context window "
            "is unknown; add max_position_embeddings or pass --context-window-size"
        )

    @classmethod
    def _hf_tokens(cls, r: HFConfigReader) -> dict:
        return {
            "tie_word_embeddings": r.bool("tie_word_embeddings", False),
            "bos_token_id": r.token_ids("bos_token_id", cls.default_bos_token_id),
            "eos_token_id": r.token_ids("eos_token_id", cls.default_eos_token_id),
            "pad_token_id": r.token_ids("pad_token_id", None),
        }

    # ----- validation --------------------------------------------------------------------

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wanted = str(f.type)
            if wanted in ("int", "int | None"):
                ok = (value is None and wanted != "int") or (
                    isinstance(value, int) and not isinstance(value, bool)
                )
            elif wanted == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif wanted == "bool":
                ok = isinstance(value, bool)
            elif wanted == "str":
                ok = isinstance(value, str)
            else:
                continue
            if not ok:
                raise _fail(
                    f"{f.name}={value!r} ({_type_name(value)}) must be of type {wanted}; "
                    "fix config.json or the override"
                )

    def _check_common(self) -> None:
        self._check_windows()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "prefill_chunk_size",
                     "tensor_parallel_shards", "max_batch_size"):
            if getattr(self, name) <= 0:
                raise _fail(f"{name}={getattr(self, name)} must be positive; fix config.json")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads % kv_heads:
            raise _fail(
                f"num_key_value_heads={kv_heads} must divide num_attention_heads={heads}; "
                "fix config.json"
            )
        shards = self.tensor_parallel_shards
        # Fewer key/value heads than shards works when each is shared by whole groups of ranks.
        if heads % shards or (kv_heads % shards and shards % kv_heads):
            raise _fail(
                f"tensor_parallel_shards={shards} must divide num_attention_heads={heads} and "
                f"divide or be a multiple of num_key_value_heads={kv_heads}; pick a divisor "
                f"of {heads} that is a divisor or multiple of {kv_heads}"
            )
        eos = self.eos_token_id
        eos_ids = eos if isinstance(eos, tuple) else (eos,)
        if eos is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) for i in eos_ids
        ):
            raise _fail(f"eos_token_id={eos!r} must be a token id or a list of token ids")

    def _check_windows(self) -> None:
        context, sliding, sinks = (
            self.context_window_size, self.sliding_window_size, self.attention_sink_size
        )
        if sliding != -1 and sliding <= 0:
            raise _fail(f"sliding_window_size={sliding} must be positive, or -1 for none")
        if sliding > 0 and context != -1:
            raise _fail(
                f"context_window_size={context} must be -1 when sliding_window_size={sliding} "
                "is set (the sliding window bounds the cache); set context_window_size=-1"
            )
        if context == -1 and sliding <= 0:
            raise _fail(
                "context_window_size=-1 (unbounded) needs a sliding window; set "
                "sliding_window_size or a positive context_window_size"
            )
        if context != -1 and context <= 0:
            raise _fail(
                f"context_window_size={context} must be positive (or -1 with a sliding window); "
                "fix max_position_embeddings in config.json or pass --context-window-size"
            )
        if sinks < 0:
            raise _fail(f"attention_sink_size={sinks} must be >= 0")
        if sinks > 0 and not 0 < sinks < sliding:
            raise _fail(
                f"attention_sink_size={sinks} needs a sliding window larger than the sinks, got "
                f"sliding_window_size={sliding}; set sliding_window_size or attention_sink_size=0"
            )

    def validate(self) -> None:
        """Architecture-specific checks; subclasses extend this."""

    def _require_supported(self, name: str, supported: Iterable[str]) -> None:
        value = getattr(self, name)
        if value not in supported:
            raise _fail(f"{name}={value!r} is not supported for {self.model_type}; "
                        f"supported: {', '.join(supported)}")

    def _require_positive(self, *names: str) -> None:
        if not all(getattr(self, name) > 0 for name in names):
            stated = [f"{name}={getattr(self, name)}" for name in names]
            listed = stated[0] if len(stated) == 1 else (
                f"{', '.join(stated[:-1])} and {stated[-1]}")
            raise _fail(f"{listed} must be positive")

    def _require_even_head_dim(self) -> None:
        if self.head_dim % 2:
            raise _fail(f"head_dim={self.head_dim} must be even for rotary embeddings")

    # ----- derived values and JSON -------------------------------------------------------

    @property
    def kv_window(self) -> int:
        """How many positions the KV cache must hold: the context or the sliding window."""
        return self.sliding_window_size if self.context_window_size == -1 else (
            self.context_window_size
        )

    def to_json(self) -> dict:
        """The `model_config` object of mlc-chat-config.json: every field, JSON-safe."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, RopeScaling):
                value = value.to_json()
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls: type[C], d: dict) -> C:
        """Inverse of `to_json`."""
        if not isinstance(d, dict):
            raise _fail(f"model_config must be a JSON object, got {_type_name(d)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise _fail(
                f"model_config has unknown keys {unknown} for {cls.model_type or cls.__name__}; "
                "regenerate mlc-chat-config.json with gen_config"
            )
        return cls(**{k: cls._from_json_value(k, v) for k, v in d.items()})

    @classmethod
    def _from_json_value(cls, key: str, value: Any) -> Any:
        if key == "eos_token_id" and isinstance(value, list):
            return value[0] if len(value) == 1 else tuple(value)
        if key == "rope_scaling" and value is not None:
            return RopeScaling(**value)
        return value

    def with_overrides(self: C, **overrides: Any) -> C:
        """A copy with some fields replaced, validated like the original.

        Setting a sliding window makes the context unbounded (-1) unless it is given too, and
        the prefill chunk shrinks to the new window unless it is given too.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise _fail(
                f"cannot override unknown fields {unknown}; known: {', '.join(sorted(names))}"
            )
        values = dict(overrides)
        if values.get("sliding_window_size", -1) > 0 and "context_window_size" not in values:
            values["context_window_size"] = -1
        if "prefill_chunk_size" not in values:
            context = values.get("context_window_size", self.context_window_size)
            sliding = values.get("sliding_window_size", self.sliding_window_size)
            limit = sliding if context == -1 else context
            if isinstance(limit, int) and limit > 0:
                values["prefill_chunk_size"] = min(self.prefill_chunk_size, limit)
        return dataclasses.replace(self, **values)
