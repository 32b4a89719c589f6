"""Model configuration read from the official ``config.json`` (official key names)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Flags whose official values this implementation supports; any other value fails at load.
_REQUIRED_FLAGS: dict[str, Any] = {
    "rmsnorm": True,
    "multi_query_attention": True,
    "apply_residual_connection_post_layernorm": False,
    "add_bias_linear": False,
    "post_layer_norm": True,
    "original_rope": True,
    "fp32_residual_connection": False,
    "tie_word_embeddings": False,
}


# The type and range each numeric key must have (checked before anything is built from it).
_POSITIVE_INTS = ("hidden_size", "num_layers", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                  "multi_query_group_num", "padded_vocab_size", "seq_length")
_NON_NEGATIVE_INTS = ("eos_token_id", "pad_token_id", "quantization_bit")
_POSITIVE_FLOATS = ("layernorm_epsilon", "rope_ratio")
_STRINGS = ("torch_dtype", "model_type", "_name_or_path")


class UnsupportedConfigError(ValueError):
    """The config.json describes a model this implementation does not run."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_value_types(raw: dict[str, Any], source: str) -> None:
    """UnsupportedConfigError naming the file and every key whose value has the wrong type or range
    (a string for a size, 2.5 layers, 0 key-value groups, a negative or NaN rope_ratio...).
    ``null`` stands for the default where the official files use it (rope_ratio, quantization_bit)."""
    problems = []
    for key in _POSITIVE_INTS:
        if key in raw and not (_is_int(raw[key]) and raw[key] > 0):
            problems.append(f"{key} must be a positive integer, got {raw[key]!r}")
    for key in _NON_NEGATIVE_INTS:
        value = raw.get(key)
        if key == "eos_token_id" and isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value):
            continue
        if value is not None and not (_is_int(value) and value >= 0):
            problems.append(f"{key} must be a non-negative integer, got {value!r}")
    for key in _POSITIVE_FLOATS:
        value = raw.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            problems.append(f"{key} must be a positive finite number, got {value!r}")
    if "add_qkv_bias" in raw and not isinstance(raw["add_qkv_bias"], bool):
        problems.append(f"add_qkv_bias must be true or false, got {raw['add_qkv_bias']!r}")
    for key in _STRINGS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            problems.append(f"{key} must be a string, got {raw[key]!r}")
    if problems:
        raise UnsupportedConfigError(f"{source}: " + "; ".join(problems))


@dataclass
class ChatGLMConfig:
    """ChatGLM2/3 hyper-parameters; field names are the keys of the official config.json."""

    hidden_size: int = 4096
    num_layers: int = 28
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    multi_query_group_num: int = 2
    padded_vocab_size: int = 65024
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    rope_ratio: float = 1.0
    quantization_bit: int = 0
    add_qkv_bias: bool = True
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float16"
    model_type: str = "chatglm"
    name_or_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def qkv_out_features(self) -> int:
        """Rows of ``query_key_value``: all query heads, then the key groups, then the value groups."""
        return (self.num_attention_heads + 2 * self.multi_query_group_num) * self.kv_channels

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ChatGLMConfig":
        """Build from the official dict; unsupported flags raise ``unsupported: <key>=<value>``."""
        if raw.get("model_type") != "chatglm":
            raise UnsupportedConfigError(
                f"{source}: unsupported: model_type={raw.get('model_type')!r} (expected 'chatglm'; "
                "this service runs ChatGLM2-6B and ChatGLM3-6B checkpoints)")
        if "padded_vocab_size" not in raw:
            raise UnsupportedConfigError(
                f"{source}: no 'padded_vocab_size': this looks like a first-generation ChatGLM-6B "
                "config, which is not supported (use a ChatGLM2-6B or ChatGLM3-6B model)")
        problems = [f"unsupported: {key}={raw[key]!r}" for key, want in _REQUIRED_FLAGS.items()
                    if key in raw and raw[key] != want]
        if problems:
            raise UnsupportedConfigError(f"{source}: " + "; ".join(problems))
        check_value_types(raw, source)
        known = {f.name for f in fields(cls)} - {"extra", "name_or_path"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs["rope_ratio"] = float(raw.get("rope_ratio") or 1.0)
        kwargs["quantization_bit"] = int(raw.get("quantization_bit") or 0)
        kwargs["name_or_path"] = str(raw.get("_name_or_path", ""))
        extra = {k: v for k, v in raw.items() if k not in known}
        config = cls(**kwargs, extra=extra)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "ChatGLMConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: a model directory needs the official config.json") from None
        except json.JSONDecodeError as exc:
            raise UnsupportedConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise UnsupportedConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        checks = [
            (self.num_attention_heads % self.multi_query_group_num == 0,
             "num_attention_heads must be a multiple of multi_query_group_num"),
            (self.kv_channels % 4 == 0, "kv_channels must be a multiple of 4 (RoPE on half of each head)"),
            (self.quantization_bit in (0, 4),
             f"unsupported: quantization_bit={self.quantization_bit} (only 4-bit or unquantized)"),
            (min(self.hidden_size, self.num_layers, self.ffn_hidden_size, self.seq_length) > 0,
             "sizes must be positive"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise UnsupportedConfigError(f"{source}: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        """The official-keyed dict (extra keys kept), e.g. for writing a converted model's config."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name not in ("extra", "name_or_path"):
                out[f.name] = getattr(self, f.name)
        out["_name_or_path"] = self.name_or_path
        if not self.quantization_bit:
            out.pop("quantization_bit", None)
        return out
