"""Tiny random ChatGLM checkpoints in the official layouts, made inside the tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from chatglm.weights.convert import save_safetensors
from chatglm.quant.int4 import QUANTIZED_LINEARS, quantize_int4

BASE_CONFIG = {
    "_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 48,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 32, "kv_channels": 8,
    "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 4, "num_layers": 2, "original_rope": True, "padded_vocab_size": 65024,
    "post_layer_norm": True, "rmsnorm": True, "seq_length": 512, "use_cache": True,
    "torch_dtype": "float16", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}


def tiny_config(**overrides) -> dict:
    cfg = dict(BASE_CONFIG)
    cfg.update(overrides)
    return cfg


def random_state(cfg: dict, seed: int = 0, int4: bool = False) -> dict[str, torch.Tensor]:
    """Official state-dict keys and dtypes (fp16; int8 + fp16 scales for int4 linears)."""
    g = torch.Generator().manual_seed(seed)
    h, ffn, heads, kv = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    qkv = (heads + 2 * cfg["multi_query_group_num"]) * kv
    vocab = cfg["padded_vocab_size"]

    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).half()

    sd = {"transformer.embedding.word_embeddings.weight": rnd(vocab, h),
          "transformer.rotary_pos_emb.inv_freq": rnd(kv // 4)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = rnd(h, std=0.2, mean=1.0)
        sd[p + "self_attention.query_key_value.weight"] = rnd(qkv, h, std=1.4 / h ** 0.5)
        sd[p + "self_attention.query_key_value.bias"] = rnd(qkv, std=0.2)
        sd[p + "self_attention.dense.weight"] = rnd(h, heads * kv, std=0.9 / (heads * kv) ** 0.5)
        sd[p + "post_attention_layernorm.weight"] = rnd(h, std=0.2, mean=1.0)
        sd[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * ffn, h, std=1.2 / h ** 0.5)
        sd[p + "mlp.dense_4h_to_h.weight"] = rnd(h, ffn, std=1.2 / ffn ** 0.5)
    sd["transformer.encoder.final_layernorm.weight"] = rnd(h, std=0.2, mean=1.0)
    sd["transformer.output_layer.weight"] = rnd(vocab, h, std=1.7 / h ** 0.5)
    if int4:
        for key in list(sd):
            if key.endswith(".weight") and key.rpartition(".")[0].endswith(QUANTIZED_LINEARS):
                sd[key], sd[key + "_scale"] = quantize_int4(sd[key])
    return sd


def write_model(dest: Path, cfg: dict, sd: dict[str, torch.Tensor], fmt: str = "bin",
                tokenizer_model: Path | None = None, shard_bytes: int | None = None) -> Path:
    """Write ``sd`` as ``fmt``: "bin", "bin-sharded", "safetensors" or "safetensors-sharded"."""
    dest.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    if any(k.endswith("weight_scale") for k in sd):
        cfg["quantization_bit"] = 4
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    if fmt == "bin":
        torch.save(sd, dest / "pytorch_model.bin")
    elif fmt == "bin-sharded":
        keys = list(sd)
        half = len(keys) // 2
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        weight_map = {}
        for name, part in zip(names, (keys[:half], keys[half:])):
            torch.save({k: sd[k] for k in part}, dest / name)
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    elif fmt == "safetensors":
        save_safetensors(sd, dest)
    elif fmt == "safetensors-sharded":
        save_safetensors(sd, dest, max_shard_bytes=shard_bytes or 2_000_000)
    else:
        raise ValueError(fmt)
    if tokenizer_model is not None:
        (dest / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return dest
