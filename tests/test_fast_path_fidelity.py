"""The CPU fast path (bfloat16, the model's default int4 backend and output layer) against the float32
reference implementation's last-position logits on every fixture case: relative L2 error <= 0.03.
The float32 path itself is checked for exact agreement in test_model_fixtures.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatglm import Pipeline
from chatglm.quant.dispatch import int4_layers
from chatglm.quant.kernels import cpu_head, native
from tests.conftest import FIXTURES, load_json, needs_shared

MAX_REL_L2 = 0.03
MODELS = {"chatglm2-int4-tiny": "chatglm2_dir", "chatglm3-32k-tiny": "chatglm3_dir"}


@needs_shared
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fast_path_logits_stay_close_to_the_float32_reference(name, request):
    pipe = Pipeline.from_pretrained(request.getfixturevalue(MODELS[name]), device="cpu", dtype=torch.bfloat16)
    layers = int4_layers(pipe.model)
    if layers and native.load():
        assert {m.backend for m in layers} == {"cpu-native"}
        assert isinstance(pipe.model.transformer.output_layer, cpu_head.Int8Head) == cpu_head.usable()
    logits = np.load(FIXTURES / "models" / name / "logits.npz")
    for case in load_json(FIXTURES / "models" / name / "expected.json")["forward_cases"]:
        want = logits[case["logits_key"]]
        with torch.inference_mode():
            got = pipe.model(torch.tensor(case["input_ids"]))[:, -1].float().numpy()
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert err <= MAX_REL_L2, f"{case['name']}: relative L2 error {err:.4f}"


@needs_shared
def test_int8_output_layer_alone_keeps_the_logits(chatglm3_dir):
    """The fp16 ChatGLM3 fixture has no int4 layers: swap in the int8 output layer by hand."""
    if not native.load():
        pytest.skip(f"the C++ extension did not build here: {native.unavailable_reason()}")
    pipe = Pipeline.from_pretrained(chatglm3_dir, device="cpu", dtype=torch.bfloat16)
    pipe.model.transformer.output_layer = cpu_head.Int8Head(pipe.model.transformer.output_layer.weight)
    logits = np.load(FIXTURES / "models" / "chatglm3-32k-tiny" / "logits.npz")
    for case in load_json(FIXTURES / "models" / "chatglm3-32k-tiny" / "expected.json")["forward_cases"]:
        with torch.inference_mode():
            got = pipe.model(torch.tensor(case["input_ids"]))[:, -1].float().numpy()
        want = logits[case["logits_key"]]
        assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) <= MAX_REL_L2, case["name"]
