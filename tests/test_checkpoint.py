"""Checkpoint formats load identically; broken checkpoints fail with a message naming file or key."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chatglm.weights.checkpoint import CheckpointError, load_model
from chatglm.config import ChatGLMConfig, UnsupportedConfigError
from tests.tiny import random_state, tiny_config, write_model

IDS = torch.tensor([[64790, 64792, 36474, 54591, 31123, 13, 30910, 100, 2000, 3]])


def _logits(model_dir: Path, **kw) -> torch.Tensor:
    cfg = ChatGLMConfig.from_json(model_dir / "config.json")
    with torch.inference_mode():
        return load_model(model_dir, cfg, **kw)(IDS)


@pytest.mark.parametrize("int4", [False, True], ids=["fp16", "int4"])
def test_every_layout_gives_identical_logits(tmp_path, int4):
    cfg, sd = tiny_config(), random_state(tiny_config(), seed=1, int4=int4)
    ref = _logits(write_model(tmp_path / "bin", cfg, sd, "bin"))
    for fmt in ("bin-sharded", "safetensors", "safetensors-sharded"):
        d = write_model(tmp_path / fmt, cfg, sd, fmt)
        if fmt == "safetensors-sharded":
            assert len(list(d.glob("model-*-of-*.safetensors"))) > 1
        assert torch.equal(_logits(d), ref), fmt


def test_quantize_on_load_equals_stored_int4(tmp_path):
    cfg = tiny_config()
    fp16 = write_model(tmp_path / "fp16", cfg, random_state(cfg, seed=2), "bin")
    int4 = write_model(tmp_path / "int4", cfg, random_state(cfg, seed=2, int4=True), "safetensors")
    assert torch.equal(_logits(fp16, quantize=4), _logits(int4))
    with pytest.raises(CheckpointError, match="int4 checkpoint"):
        _logits(int4, quantize=0)


def test_missing_shard_names_the_file(tmp_path):
    d = write_model(tmp_path / "m", tiny_config(), random_state(tiny_config()), "bin-sharded")
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        _logits(d)


@pytest.mark.parametrize("fmt,name", [("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")])
def test_truncated_file_names_the_file(tmp_path, fmt, name):
    d = write_model(tmp_path / "m", tiny_config(), random_state(tiny_config()), fmt)
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name):
        _logits(d)


def test_wrong_shape_and_extra_key_are_listed_together(tmp_path):
    cfg = tiny_config()
    sd = random_state(cfg)
    sd["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    sd["transformer.encoder.layers.0.mlp.extra.weight"] = torch.zeros(2, dtype=torch.float16)
    del sd["transformer.encoder.final_layernorm.weight"]
    d = write_model(tmp_path / "m", cfg, sd, "bin")
    with pytest.raises(CheckpointError) as err:
        _logits(d)
    msg = str(err.value)
    assert "layers.0.mlp.dense_4h_to_h.weight in pytorch_model.bin: shape (3, 3), expected (32, 48)" in msg
    assert "unexpected key transformer.encoder.layers.0.mlp.extra.weight in pytorch_model.bin" in msg
    assert "missing key transformer.encoder.final_layernorm.weight" in msg


def test_wrong_dtype_is_reported(tmp_path):
    cfg = tiny_config()
    sd = random_state(cfg, int4=True)
    key = "transformer.encoder.layers.1.self_attention.dense.weight"
    sd[key] = sd[key].to(torch.int16)
    with pytest.raises(CheckpointError, match=f"{key} in pytorch_model.bin: dtype torch.int16"):
        _logits(write_model(tmp_path / "m", cfg, sd, "bin"))


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_not_executed(tmp_path):
    cfg = tiny_config()
    d = write_model(tmp_path / "m", cfg, random_state(cfg), "bin")
    marker = tmp_path / "pwned"
    sd = random_state(cfg)
    sd["transformer.encoder.final_layernorm.weight"] = _Evil(str(marker))
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused to load"):
        _logits(d)
    assert not marker.exists()


def test_missing_directory_and_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope", ChatGLMConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_model(tmp_path / "empty", ChatGLMConfig())


@pytest.mark.parametrize("key,value", [("rmsnorm", False), ("multi_query_attention", False),
                                       ("apply_residual_connection_post_layernorm", True),
                                       ("add_bias_linear", True)])
def test_unsupported_config_flags_fail_at_load(key, value):
    with pytest.raises(UnsupportedConfigError, match=f"unsupported: {key}={value!r}"):
        ChatGLMConfig.from_dict(tiny_config(**{key: value}))


def test_config_reads_official_keys():
    cfg = ChatGLMConfig.from_dict(tiny_config(rope_ratio=50, quantization_bit=4))
    assert (cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size, cfg.rope_ratio, cfg.quantization_bit) == \
        (32, 2, 48, 50.0, 4)
    assert ChatGLMConfig.from_dict(tiny_config()).rope_ratio == 1.0
    assert cfg.qkv_out_features == (4 + 2 * 2) * 8


def test_safetensors_reader_matches_the_library_and_refuses_malformed_files(tmp_path):
    from safetensors.torch import save_file

    from chatglm.weights.safetensors_read import SafetensorsFormatError, iter_safetensors, read_header
    g = torch.Generator().manual_seed(0)
    tensors = {"a.f16": torch.randn(3, 5, generator=g).half(), "b.bf16": torch.randn(7, generator=g).bfloat16(),
               "c.i8": torch.randint(-128, 128, (4, 6), generator=g, dtype=torch.int8),
               "d.f32": torch.randn(2, 2, 2, generator=g), "e.empty": torch.empty(0, 4), "f.bool": torch.tensor([True, False])}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    got = dict(iter_safetensors(path))
    assert sorted(got) == sorted(tensors)
    for key, want in tensors.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape and torch.equal(got[key], want), key
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for blob, message in [(data[:-3], "ends at byte"), (data[:5], "too short"),
                          ((10**9).to_bytes(8, "little") + data[8:], "does not fit"),
                          (data[:8] + b"{" * (len(data) - 8), "not valid JSON")]:
        bad.write_bytes(blob)
        with pytest.raises(SafetensorsFormatError, match=message):
            read_header(bad)
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"I8"', b'"I9"')
    bad.write_bytes(data[:8] + header + data[8 + n:])
    with pytest.raises(SafetensorsFormatError, match="c.i8: dtype 'I9' is not one of F64"):
        read_header(bad)


def test_safetensors_reader_thread_stops_when_the_caller_stops_early(tmp_path):
    import threading

    from safetensors.torch import save_file

    from chatglm.weights.safetensors_read import iter_safetensors
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(20)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    for read_ahead in (0, 1, 3):
        gen = iter_safetensors(path, read_ahead=read_ahead)
        key, tensor = next(gen)
        assert torch.equal(tensor, tensors[key])
        gen.close()
        assert not [t for t in threading.enumerate() if t.name == "safetensors-reader"]
        assert {k: v.clone() for k, v in iter_safetensors(path, read_ahead=read_ahead)}.keys() == tensors.keys()
