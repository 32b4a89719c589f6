"""Random-weight checkpoints in the official int4 format, for benchmarks.

The weights are random but every shape, dtype and key is the published one, so loading, packing and
every kernel do exactly the work they do for the real model. Codes are uniform over all 16 nibble
values and each row's fp16 scale makes the row's standard deviation about ``1/sqrt(in_features)``,
so activations stay finite through all layers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import ChatGLMConfig
from ..weights.convert import save_safetensors

SHAPES: dict[str, dict] = {
    "6b": {},  # the ChatGLM2-6B defaults of ChatGLMConfig
    "tiny": {"hidden_size": 64, "num_layers": 2, "ffn_hidden_size": 160, "kv_channels": 16,
             "num_attention_heads": 4, "multi_query_group_num": 2, "padded_vocab_size": 1024,
             "seq_length": 4096},
}
_CODE_STD = 4.6  # standard deviation of a code uniform over -8..7
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatglm-bench"
"""Where random checkpoints are built once and kept."""
FORMAT_VERSION = 1  # bump when the files written here change, so cached checkpoints are rebuilt


def bench_config(shape: str) -> dict:
    """The official config.json dict of a ChatGLM2-6B-shaped (or tiny) int4 model."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    cfg = ChatGLMConfig(**SHAPES[shape], quantization_bit=4, name_or_path=f"chatglm-bench/{shape}-random")
    raw = cfg.to_dict()
    raw.update({"architectures": ["ChatGLMModel"], "rmsnorm": True, "multi_query_attention": True,
                "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
                "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False,
                "bench_format_version": FORMAT_VERSION})
    return raw


def random_int4_state(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official keys and dtypes: int8 codes + fp16 scales for the encoder linears, fp16 elsewhere."""
    cfg = ChatGLMConfig.from_dict(raw)
    g = torch.Generator().manual_seed(seed)
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).half()

    def int4(out: int, inp: int, prefix: str, sd: dict) -> None:
        sd[prefix + ".weight"] = torch.randint(-128, 128, (out, inp // 2), generator=g, dtype=torch.int8)
        scale = torch.full((out,), 1.0 / (inp ** 0.5 * _CODE_STD)) * (1 + 0.1 * torch.rand(out, generator=g))
        sd[prefix + ".weight_scale"] = scale.half()

    sd: dict[str, torch.Tensor] = {"transformer.embedding.word_embeddings.weight":
                                   normal(cfg.padded_vocab_size, h, std=1.0)}
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
        int4(cfg.qkv_out_features, h, p + "self_attention.query_key_value", sd)
        sd[p + "self_attention.query_key_value.bias"] = normal(cfg.qkv_out_features, std=0.1)
        int4(h, cfg.num_attention_heads * cfg.kv_channels, p + "self_attention.dense", sd)
        sd[p + "post_attention_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
        int4(2 * ffn, h, p + "mlp.dense_h_to_4h", sd)
        int4(h, ffn, p + "mlp.dense_4h_to_h", sd)
    sd["transformer.encoder.final_layernorm.weight"] = normal(h, std=0.1, mean=1.0)
    sd["transformer.output_layer.weight"] = normal(cfg.padded_vocab_size, h, std=1.0 / h ** 0.5)
    return sd


def ensure_checkpoint(cache_dir: str | Path, shape: str, seed: int = 0) -> Path:
    """The directory of the cached random checkpoint for ``shape``, built on first use
    (config.json + one ``model.safetensors``, as written by ``python -m chatglm.convert``)."""
    raw = bench_config(shape)
    out = Path(cache_dir) / f"chatglm2-{shape}-int4-random-s{seed}"
    config_path, weights = out / "config.json", out / "model.safetensors"
    if config_path.is_file() and weights.is_file():
        try:
            if json.loads(config_path.read_text()) == raw:
                return out
        except json.JSONDecodeError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    config_path.unlink(missing_ok=True)  # written last: its presence marks a complete checkpoint
    save_safetensors(random_int4_state(raw, seed), out)
    config_path.write_text(json.dumps(raw, indent=2) + "\n")
    return out
