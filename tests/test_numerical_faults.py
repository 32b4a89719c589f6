"""A model whose logits stop being finite (corrupted weights in a valid file) fails the request with a
clear error, for greedy and sampled decoding alike, instead of garbage text or torch's internals."""
from __future__ import annotations

import pytest
import torch

from chatglm.config import ChatGLMConfig
from chatglm.serving.generation import NonFiniteLogitsError, generate_ids
from chatglm.serving.sampling import SamplingParams
from chatglm.weights.checkpoint import load_model
from tests.tiny import random_state, tiny_config, write_model

PROMPT = [64790, 64792, 36474, 54591, 31123, 13]
MODES = [SamplingParams(0.0), SamplingParams(0.8, 0.8, 50), SamplingParams(1.0, 1.0, 0, 1.2)]


def _model(tmp_path, poison: str, value: float, int4: bool = False):
    cfg = tiny_config(seq_length=64)
    state = random_state(cfg, seed=5, int4=int4)
    state[poison] = state[poison].clone()
    state[poison].view(-1)[3] = value
    d = write_model(tmp_path, cfg, state, "safetensors")
    return load_model(d, ChatGLMConfig.from_json(d / "config.json"), quantize=4 if int4 else None)


@pytest.mark.parametrize("params", MODES, ids=["greedy", "sampled", "sampled-penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_fail_the_request_at_the_prompt(tmp_path, params, value):
    model = _model(tmp_path, "transformer.encoder.final_layernorm.weight", value)
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite logits for the prompt"):
        list(generate_ids(model, PROMPT, 8, params, (), 64, torch.Generator().manual_seed(0)))


def test_a_fault_that_appears_while_decoding_names_the_token(tmp_path):
    """The embedding row of one token is corrupted: the prompt is fine, the step after that token is not."""
    cfg = tiny_config(seq_length=64)
    state = random_state(cfg, seed=5)
    d = write_model(tmp_path, cfg, state, "safetensors")
    model = load_model(d, ChatGLMConfig.from_json(d / "config.json"))
    free = list(generate_ids(model, PROMPT, 6, SamplingParams(0.0), (), 64))
    with torch.no_grad():
        model.transformer.embedding.word_embeddings.weight[free[2]] = float("nan")
    gen = generate_ids(model, PROMPT, 6, SamplingParams(0.0), (), 64)
    assert [next(gen) for _ in range(3)] == free[:3]
    with pytest.raises(NonFiniteLogitsError, match="at generated token 4"):
        next(gen)
