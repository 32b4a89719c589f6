"""Golden checks against the reference implementation's outputs (../shared/fixtures/models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatglm import Pipeline
from tests.conftest import FIXTURES, load_json, needs_shared

MODELS = ["chatglm2-int4-tiny", "chatglm3-32k-tiny"]


def _cases(kind: str):
    out = []
    for name in MODELS:
        path = FIXTURES / "models" / name / "expected.json"
        if path.is_file():
            out += [pytest.param(name, c, id=f"{name}:{c['name']}") for c in load_json(path)[kind]]
    return out or [pytest.param(None, None, marks=pytest.mark.skip(reason="../shared fixtures are absent"))]


@pytest.fixture(scope="module")
def pipes(chatglm2_dir, chatglm3_dir):
    return {
        "chatglm2-int4-tiny": Pipeline.from_pretrained(chatglm2_dir, device="cpu", dtype=torch.float32),
        "chatglm3-32k-tiny": Pipeline.from_pretrained(chatglm3_dir, device="cpu", dtype=torch.float32),
    }


@needs_shared
@pytest.mark.parametrize("name,case", _cases("forward_cases"))
def test_forward_logits_match_reference(pipes, name, case):
    expected = np.load(FIXTURES / "models" / name / "logits.npz")[case["logits_key"]]
    with torch.inference_mode():
        got = pipes[name].model(torch.tensor(case["input_ids"]))[:, -1].numpy()
    assert got.shape == tuple(case["logits_shape"])
    diff = np.abs(got - expected)
    assert np.all(diff <= 1e-4 + 1e-3 * np.abs(expected)), f"max |diff| {diff.max():.3g}"
    assert got.argmax(-1).tolist() == case["argmax"]


@needs_shared
@pytest.mark.parametrize("name,case", _cases("generate_cases"))
def test_greedy_generation_matches_reference(pipes, name, case):
    got = list(pipes[name].generate(case["input_ids"], max_new_tokens=case["max_new_tokens"], temperature=0.0))
    assert got == case["new_ids"]


@needs_shared
def test_family_detection(pipes):
    assert pipes["chatglm2-int4-tiny"].family == "chatglm2"
    assert pipes["chatglm3-32k-tiny"].family == "chatglm3-32k"
    assert pipes["chatglm2-int4-tiny"].stop_ids == (2,)
    assert pipes["chatglm3-32k-tiny"].stop_ids == (2, 64795, 64797)


@needs_shared
@pytest.mark.parametrize("name", MODELS)
def test_stream_answers_a_chat_end_to_end(pipes, name):
    pipe = pipes[name]
    messages = [{"role": "user", "content": "你好"}]
    chunks = list(pipe.stream(messages, max_new_tokens=16, temperature=0.0))
    assert chunks and all(isinstance(c, str) and c for c in chunks)
    assert "\ufffd" not in "".join(chunks)
    assert "".join(chunks) == pipe.chat(messages, max_new_tokens=16, temperature=0.0)
