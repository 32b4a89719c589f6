"""The int4 safety net: a backend that fails to build, raises or computes wrong numbers on the real
layer shapes is dropped for the next one, with one logged reason, and the model's output stays right."""
from __future__ import annotations

import logging

import pytest
import torch

from chatglm.config import ChatGLMConfig
from chatglm.quant import dispatch, selfcheck
from chatglm.serving.loading import int4_shapes, load_for_inference
from tests.tiny import random_state, tiny_config, write_model

CPU = torch.device("cpu")


class Raises(dispatch.Backend):
    name = "test-raises"

    def prepare(self, layer):
        raise RuntimeError("kernel failed to compile: injected")


class Wrong(dispatch.Backend):
    name = "test-wrong"

    def matmul(self, layer, x):
        return super().matmul(layer, x) * 1.5


class RaisesAtRun(dispatch.Backend):
    name = "test-raises-at-run"

    def matmul(self, layer, x):
        if x.shape[0] > 8:  # fails only at prefill row counts
            raise RuntimeError("out of shared memory: injected")
        return super().matmul(layer, x)


@pytest.fixture(autouse=True)
def injected(monkeypatch):
    for b in (Raises(), Wrong(), RaisesAtRun()):
        monkeypatch.setitem(dispatch.BACKENDS, b.name, b)
    selfcheck.forget_verdicts()
    yield
    selfcheck.forget_verdicts()


@pytest.mark.parametrize("bad", ["test-raises", "test-wrong", "test-raises-at-run"])
def test_a_failing_backend_is_dropped_for_the_next_with_one_logged_reason(bad, caplog):
    shapes = [(48, 64), (32, 96)]
    with caplog.at_level(logging.WARNING, logger="chatglm.quant.selfcheck"):
        assert selfcheck.select_backend(CPU, torch.bfloat16, shapes, [bad, "reference"]) == "reference"
        assert selfcheck.select_backend(CPU, torch.bfloat16, shapes, [bad, "reference"]) == "reference"
    drops = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(drops) == 1, drops
    want = {"test-raises": "injected", "test-wrong": "relative error", "test-raises-at-run": "injected"}[bad]
    assert want in drops[0]


def test_a_passing_backend_is_kept_and_the_chain_ends_at_reference():
    shapes = [(48, 64)]
    if "cpu-int4" in dispatch.candidates(CPU, torch.bfloat16):
        assert selfcheck.select_backend(CPU, torch.bfloat16, shapes, ["test-wrong", "cpu-int4"]) == "cpu-int4"
    assert selfcheck.select_backend(CPU, torch.bfloat16, shapes, ["test-raises", "test-wrong"]) == "reference"
    assert selfcheck.check_backend("reference", CPU, torch.float32, shapes) is None


def test_unknown_backend_names_are_refused():
    with pytest.raises(ValueError, match="unknown int4 backend 'nope'"):
        selfcheck.select_backend(CPU, torch.bfloat16, [(48, 64)], ["nope"])


def test_a_model_loaded_past_failing_backends_computes_like_the_reference(tmp_path, monkeypatch, caplog):
    cfg = tiny_config(seq_length=64)
    model_dir = write_model(tmp_path, cfg, random_state(cfg, seed=3, int4=True), "safetensors")
    config = ChatGLMConfig.from_json(model_dir / "config.json")
    assert len(int4_shapes(config)) == 4
    monkeypatch.setitem(dispatch.PREFERENCE, "cpu", ("test-raises", "test-wrong", "reference"))
    with caplog.at_level(logging.WARNING, logger="chatglm.quant.selfcheck"):
        model, backend = load_for_inference(model_dir, config, CPU, torch.bfloat16)
    assert backend == "reference"
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 2
    ref, _ = load_for_inference(model_dir, config, CPU, torch.bfloat16, backend="reference")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        assert torch.equal(model(ids), ref(ids))
