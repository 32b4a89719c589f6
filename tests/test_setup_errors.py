"""Every setup failure a user can cause names the file and the key: config.json values of the wrong
type or range, malformed safetensors headers, shard indexes and .bin files."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from chatglm.config import ChatGLMConfig, UnsupportedConfigError
from tests.predict_helpers import make_predictor
from tests.tiny import random_state, tiny_config, write_model


@pytest.mark.parametrize("key,value,words", [
    ("seq_length", "abc", "seq_length must be a positive integer, got 'abc'"),
    ("kv_channels", "16", "kv_channels must be a positive integer, got '16'"),
    ("num_layers", 2.5, "num_layers must be a positive integer, got 2.5"),
    ("num_layers", True, "num_layers must be a positive integer, got True"),
    ("multi_query_group_num", 0, "multi_query_group_num must be a positive integer, got 0"),
    ("hidden_size", -32, "hidden_size must be a positive integer, got -32"),
    ("padded_vocab_size", None, "padded_vocab_size must be a positive integer, got None"),
    ("rope_ratio", -1, "rope_ratio must be a positive finite number, got -1"),
    ("rope_ratio", 0, "rope_ratio must be a positive finite number, got 0"),
    ("rope_ratio", "2", "rope_ratio must be a positive finite number, got '2'"),
    ("layernorm_epsilon", float("nan"), "layernorm_epsilon must be a positive finite number, got nan"),
    ("quantization_bit", "4", "quantization_bit must be a non-negative integer, got '4'"),
    ("eos_token_id", [2, "x"], "eos_token_id must be a non-negative integer, got [2, 'x']"),
    ("add_qkv_bias", "yes", "add_qkv_bias must be true or false, got 'yes'"),
    ("torch_dtype", 16, "torch_dtype must be a string, got 16"),
])
def test_config_values_of_the_wrong_type_or_range(key: str, value: Any, words: str) -> None:
    with pytest.raises(UnsupportedConfigError) as info:
        ChatGLMConfig.from_dict(tiny_config(**{key: value}), source="m/config.json")
    assert str(info.value).startswith("m/config.json: ") and words in str(info.value), str(info.value)


def test_config_nulls_and_official_forms_load() -> None:
    cfg = ChatGLMConfig.from_dict(tiny_config(rope_ratio=None, quantization_bit=None, eos_token_id=[2, 64795]))
    assert cfg.rope_ratio == 1.0 and cfg.quantization_bit == 0


def _model(root: Path, tokenizer: Path, fmt: str = "safetensors") -> Path:
    cfg = tiny_config()
    return write_model(root / "model", cfg, random_state(cfg), fmt, tokenizer_model=tokenizer)


def _rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _offsets_as(kind: str) -> Callable[[Path, Path], Path]:
    def make(root: Path, tokenizer: Path) -> Path:
        d = _model(root, tokenizer)

        def change(header: dict) -> None:
            entry = _first_tensor(header)
            entry["data_offsets"] = ([str(o) for o in entry["data_offsets"]] if kind == "strings"
                                     else [float(o) for o in entry["data_offsets"]])
        _rewrite_header(d / "model.safetensors", change)
        return d
    return make


def _shape_with_a_float(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer)
    _rewrite_header(d / "model.safetensors", lambda h: _first_tensor(h).update(shape=[2.5]))
    return d


def _entry_not_an_object(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer)
    _rewrite_header(d / "model.safetensors", lambda h: h.update({next(k for k in h if k != "__metadata__"): 7}))
    return d


def _weight_map_number(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer, "bin-sharded")
    index = d / "pytorch_model.bin.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"][next(iter(raw["weight_map"]))] = 3
    index.write_text(json.dumps(raw))
    return d


def _weight_map_not_an_object(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer, "bin-sharded")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": ["a.bin"]}))
    return d


def _weight_map_path(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer, "bin-sharded")
    index = d / "pytorch_model.bin.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"][next(iter(raw["weight_map"]))] = "../../etc/passwd"
    index.write_text(json.dumps(raw))
    return d


def _bin_with_int_key(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer, "bin")
    sd = random_state(tiny_config())
    sd[7] = torch.zeros(1)
    torch.save(sd, d / "pytorch_model.bin")
    return d


def _config_value(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer)
    raw = json.loads((d / "config.json").read_text())
    raw["seq_length"] = "abc"
    (d / "config.json").write_text(json.dumps(raw))
    return d


BROKEN = [
    pytest.param(_offsets_as("strings"), ["model.safetensors", "data_offsets must be two integers"], id="offsets-strings"),
    pytest.param(_offsets_as("floats"), ["model.safetensors", "data_offsets must be two integers"], id="offsets-floats"),
    pytest.param(_shape_with_a_float, ["model.safetensors", "shape must be a list of non-negative integers"],
                 id="shape-float"),
    pytest.param(_entry_not_an_object, ["model.safetensors", "header entry must be an object"], id="entry-int"),
    pytest.param(_weight_map_number, ["pytorch_model.bin.index.json", "must be a shard file name", "got 3"],
                 id="weight-map-number"),
    pytest.param(_weight_map_not_an_object, ["pytorch_model.bin.index.json", "needs a \"weight_map\" object"],
                 id="weight-map-list"),
    pytest.param(_weight_map_path, ["pytorch_model.bin.index.json", "'../../etc/passwd'"], id="weight-map-path"),
    pytest.param(_bin_with_int_key, ["pytorch_model.bin", "keyed by name", "the key 7"], id="bin-int-key"),
    pytest.param(_config_value, ["config.json", "seq_length must be a positive integer, got 'abc'"], id="config"),
]


@pytest.mark.parametrize("make,words", BROKEN)
def test_setup_fails_naming_the_file_and_the_key(tmp_path: Path, tokenizer_model: Path,
                                                 make: Callable[[Path, Path], Path], words: list[str]) -> None:
    model_dir = make(tmp_path, tokenizer_model)
    with pytest.raises((UnsupportedConfigError, RuntimeError, ValueError)) as info:
        make_predictor(model_dir)
    assert type(info.value).__name__ in ("UnsupportedConfigError", "CheckpointError"), repr(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)
