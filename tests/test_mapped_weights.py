"""Safetensors weights are used in place from a mapping of the file (zero-copy setup): what the model
keeps as stored is a view of the mapping, what is converted is released, and the loaded model is the
one the plain file reads give."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from chatglm.config import ChatGLMConfig
from chatglm.serving.loading import load_for_inference
from chatglm.weights import checkpoint, mapped
from chatglm.weights.checkpoint import EMBEDDING_KEY, load_model
from tests.tiny import random_state, tiny_config, write_model

IDS = torch.tensor([[64790, 64792, 36474, 54591, 31123, 13, 30910, 100, 2000, 3]])


def _is_mapped(t: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() in mapped._mappings


def _rss_file_kib() -> int:
    return int(re.search(r"RssFile:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _no_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path):
        raise OSError(f"mmap refused for {path}")
    monkeypatch.setattr(checkpoint, "MappedSafetensors", refuse)


@pytest.fixture()
def int4_dir(tmp_path: Path) -> Path:
    cfg = tiny_config()
    return write_model(tmp_path / "int4", cfg, random_state(cfg, seed=3, int4=True), "safetensors")


def test_mapped_reader_matches_the_library_including_unaligned_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a.u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),  # the next ones start unaligned
               "b.f16": torch.randn(5, 7, generator=g).half(), "c.f32": torch.randn(3, 3, generator=g),
               "d.i8": torch.randint(-128, 128, (4, 6), generator=g, dtype=torch.int8), "e.empty": torch.empty(0, 4),
               "f.bf16": torch.randn(9, generator=g).bfloat16()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    got = dict(mapped.MappedSafetensors(path).tensors())
    assert sorted(got) == sorted(tensors)
    for key, want in tensors.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape and torch.equal(got[key], want), key
    assert _is_mapped(got["a.u8"]) and _is_mapped(got["d.i8"])


def test_int4_model_keeps_codes_scales_and_embedding_in_place(int4_dir: Path) -> None:
    cfg = ChatGLMConfig.from_json(int4_dir / "config.json")
    model = load_model(int4_dir, cfg, dtype=torch.bfloat16)
    layer = model.transformer.encoder.layers[0].self_attention.query_key_value
    assert _is_mapped(layer.weight) and _is_mapped(layer.weight_scale)
    embedding = model.transformer.embedding.word_embeddings.weight
    assert embedding.dtype == torch.float16 and _is_mapped(embedding)  # as stored: rows are cast on lookup
    assert model.dtype == torch.bfloat16
    assert model.transformer.output_layer.weight.dtype == torch.bfloat16  # cast: not a view of the file
    assert not _is_mapped(model.transformer.output_layer.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_mapped_load_equals_the_read_path(int4_dir: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = ChatGLMConfig.from_json(int4_dir / "config.json")
    with torch.inference_mode():
        got = load_model(int4_dir, cfg, dtype=dtype)(IDS)
        _no_mapping(monkeypatch)
        with caplog.at_level(logging.WARNING, logger="chatglm.weights.checkpoint"):
            read = load_model(int4_dir, cfg, dtype=dtype)
        assert "cannot be memory-mapped (OSError: mmap refused" in caplog.text
        assert not _is_mapped(read.transformer.encoder.layers[0].self_attention.query_key_value.weight)
        assert torch.equal(got, read(IDS))
    # Casting the looked-up rows gives what casting the whole table gave.
    table = read.transformer.embedding.word_embeddings.weight
    assert torch.equal(table.to(dtype)[IDS], read.transformer.embedding(IDS).to(dtype))


def test_populate_fallback_touches_pages_and_is_logged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file
    tensors = {f"t{i}": torch.arange(5000, dtype=torch.float32) * i for i in range(3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    real = mapped._advise
    monkeypatch.setattr(mapped, "_advise", lambda m, advice, b, e: False if advice == mapped.MADV_POPULATE_READ
                        else real(m, advice, b, e))
    monkeypatch.setitem(mapped._populate, "ok", True)
    with caplog.at_level(logging.INFO, logger="chatglm.weights.mapped"):
        got = dict(mapped.MappedSafetensors(path).tensors())
    assert caplog.text.count("MADV_POPULATE_READ is not available") == 1
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_release_drops_resident_pages_and_keeps_the_contents(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    big = torch.randint(-128, 128, (32 << 20,), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "m.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, str(path))
    got = dict(mapped.MappedSafetensors(path).tensors())
    before = _rss_file_kib()
    assert mapped.release(got["big"])
    assert before - _rss_file_kib() > 24 << 10  # most of the 32 MiB left the resident set
    assert torch.equal(got["big"], big)  # read back from the file
    assert not mapped.release(torch.ones(4)) and not mapped.release(big)  # not mapped: untouched
    assert torch.equal(big, big.clone())


def test_converted_tensors_are_released(int4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[int] = []
    real = mapped.release

    def spy(t: torch.Tensor) -> bool:
        released.append(t.data_ptr())
        return real(t)
    monkeypatch.setattr(checkpoint, "release", spy)
    cfg = ChatGLMConfig.from_json(int4_dir / "config.json")
    model = load_model(int4_dir, cfg, dtype=torch.bfloat16)
    kept = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if _is_mapped(t)}
    header = {k: e for k, e in mapped.MappedSafetensors(int4_dir / "model.safetensors").header.items()
              if k not in checkpoint.IGNORED_KEYS}
    cast = [k for k, e in header.items() if e["dtype"] in ("F16", "F32") and k != EMBEDDING_KEY
            and not k.endswith(".weight_scale")]
    assert len(kept) == len(header) - len(cast)  # codes, scales and the embedding are used in place
    assert len(released) == len(cast) and not kept & set(released)


def test_int8_head_is_quantized_from_the_stored_weight(int4_dir: Path) -> None:
    from chatglm.quant.dispatch import int8_head_used
    if not int8_head_used("cpu-native"):
        pytest.skip("the int8 output layer needs our C++ kernels and AVX512-VNNI, not available here")
    cfg = ChatGLMConfig.from_json(int4_dir / "config.json")
    model, backend = load_for_inference(int4_dir, cfg, torch.device("cpu"), torch.bfloat16, backend="cpu-native")
    head = model.transformer.output_layer
    assert type(head).__name__ == "Int8Head" and backend == "cpu-native"
    from chatglm.quant.kernels import native
    stored = dict(mapped.MappedSafetensors(int4_dir / "model.safetensors").tensors())["transformer.output_layer.weight"]
    codes, scale = native.quantize_rows_int8(stored)
    assert stored.dtype == torch.float16 and torch.equal(head.weight, codes) and torch.equal(head.weight_scale, scale)


def test_prefetch_reads_in_the_background_without_staying_resident(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    path = tmp_path / "m.safetensors"
    save_file({"big": torch.zeros(32 << 20, dtype=torch.int8)}, str(path))
    before = _rss_file_kib()
    thread = mapped.prefetch([path, tmp_path / "missing.safetensors"])
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert _rss_file_kib() - before < 8 << 10  # each chunk is let go once read; a missing file ends it quietly
