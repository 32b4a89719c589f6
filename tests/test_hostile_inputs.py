"""Hostile inputs in-process: each one a failed prediction whose error names the input and the rule,
never an internal exception, never an invalid input accepted."""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from chatglm.serving.inputs import MAX_JSON_DEPTH, InputError, build_request
from chatglm.text.stops import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from tests.predict_helpers import predict_text

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")


def _error(predictor: Any, **inputs: Any) -> str:
    with pytest.raises(InputError) as info:
        predict_text(predictor, **{"max_tokens": 4, **inputs})
    return str(info.value)


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


DEEP = 5000


@pytest.mark.parametrize("field,inputs", [
    ("messages", {"messages": _nested(DEEP)}),
    ("messages", {"messages": '[{"role": "user", "content": "hi", "metadata": ' + _nested(DEEP) + "}]"}),
    ("messages", {"messages": '[{"role": "user", "content": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}]"}),
    ("tools", {"prompt": "hi", "tools": "[" + '{"p": ' * DEEP + "1" + "}" * DEEP + "]"}),
], ids=["messages-lists", "metadata", "content-objects", "tools"])
def test_json_nested_thousands_deep(predictor3: Any, field: str, inputs: dict) -> None:
    message = _error(predictor3, **inputs)
    assert message.startswith(f"{field}: nested more than {MAX_JSON_DEPTH} lists or objects deep"), message


def test_json_depth_ignores_brackets_inside_strings(predictor3: Any) -> None:
    from chatglm.serving.inputs import check_json_depth

    content = "[" * 1000 + "{" * 1000 + '\\"['
    request = build_request(predictor3.pipe, "", messages=json.dumps([{"role": "user", "content": content}]))
    assert request.messages[-1]["content"] == content
    check_json_depth("messages", _nested(MAX_JSON_DEPTH))
    with pytest.raises(InputError, match=f"messages: nested more than {MAX_JSON_DEPTH}"):
        check_json_depth("messages", _nested(MAX_JSON_DEPTH + 1))


@pytest.mark.parametrize("role", [["user"], {"user": 1}, 5, None, True], ids=["list", "object", "int", "null", "bool"])
def test_role_of_the_wrong_type(predictor: Any, role: Any) -> None:
    message = _error(predictor, messages=json.dumps([{"role": role, "content": "hi"}]))
    assert message.startswith("messages: messages[0]: role must be a string"), message


@pytest.fixture(params=["chatglm2", "chatglm3"])
def predictor(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"predictor{request.param[-1]}")


@pytest.mark.parametrize("message,words", [
    ({"role": "user", "content": None}, "content must be a string, got NoneType"),
    ({"role": "user", "content": ["a"]}, "content must be a string, got list"),
    ({"role": "user"}, "'content' is missing"),
], ids=["null", "list", "missing"])
def test_system_prompt_with_bad_content(predictor: Any, message: dict, words: str) -> None:
    """ChatGLM2 puts the system prompt into the first user message: that message is checked first."""
    error = _error(predictor, system_prompt="be brief", messages=json.dumps([message]))
    assert error.startswith("messages: messages[0]: ") and words in error, error


@pytest.mark.parametrize("extra", [{"system_prompt": "be brief"}, {"tools": '[{"name": "f"}]'},
                                   {"system_prompt": "be brief", "tools": '[{"name": "f"}]'}],
                         ids=["system-prompt", "tools", "both"])
def test_errors_name_the_index_the_caller_sent(predictor3: Any, extra: dict) -> None:
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}, {"role": "user", "content": "x"}]
    error = _error(predictor3, messages=json.dumps(convo), **extra)
    assert error.startswith("messages: messages[1]: content must be a string"), error
    last = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]
    error = _error(predictor3, messages=json.dumps(last), **extra)
    assert error.startswith("messages: messages[1]: the conversation must end with"), error


def test_a_million_stop_sequences_fail_at_once(predictor2: Any) -> None:
    started = time.perf_counter()
    error = _error(predictor2, prompt="hi", stop_sequences=",".join(f"s{i}" for i in range(1_000_000)))
    error_json = _error(predictor2, prompt="hi", stop_sequences=json.dumps([f"s{i}" for i in range(1_000_000)]))
    assert time.perf_counter() - started < 10
    for message in (error, error_json):
        assert message == (f"stop_sequences: 1000000 stop sequences given; at most {MAX_STOP_SEQUENCES} "
                           "are allowed"), message


def test_megabytes_of_stop_text_fail_at_once(predictor2: Any) -> None:
    error = _error(predictor2, prompt="hi", stop_sequences="x" * 4_000_000)
    assert error == (f"stop_sequences: stop sequence 0 is 4000000 characters long; each may have at most "
                     f"{MAX_STOP_CHARS}"), error


def test_stop_sequences_at_the_bounds_are_fast(predictor2: Any) -> None:
    """The largest allowed set of stop sequences through the whole predict() path: the answer is
    unchanged (none occurs) and the time stays near that of no stop sequences."""
    stops = json.dumps(["a" * (MAX_STOP_CHARS - 1) + chr(0x4E00 + i) for i in range(MAX_STOP_SEQUENCES)])
    inputs = {"prompt": "你好", "temperature": 0, "max_tokens": 16}
    started = time.perf_counter()
    plain = predict_text(predictor2, **inputs)
    base = time.perf_counter() - started
    started = time.perf_counter()
    assert predict_text(predictor2, stop_sequences=stops, **inputs) == plain
    assert time.perf_counter() - started < 3 * base + 1.0


@pytest.mark.parametrize("name,value,expected", [("max_tokens", 4.0, None), ("max_tokens", 4.5, "max_tokens"),
                                                 ("top_k", 50.0, None), ("seed", 3.0, None), ("seed", "7", "seed"),
                                                 ("max_tokens", True, "max_tokens")])
def test_integer_inputs(predictor2: Any, name: str, value: Any, expected: str | None) -> None:
    """coglet validates against JSON Schema, which counts 4.0 as an integer: it arrives as a float."""
    inputs = {"prompt": "你好", "temperature": 0, "max_tokens": 4, name: value}
    if expected is None:
        assert predict_text(predictor2, **inputs) == predict_text(predictor2, **{**inputs, name: int(value)})
    else:
        assert _error(predictor2, **inputs).startswith(f"{expected}: must be an integer, got {value!r}")


def test_tools_on_the_32k_model_warn_in_the_logs(predictor3: Any, capsys: pytest.CaptureFixture) -> None:
    assert predictor3.pipe.family == "chatglm3-32k"
    predict_text(predictor3, prompt="hi", tools='[{"name": "f"}]')
    assert "warning: tools: ChatGLM3-6B-32K was not trained for tool calls" in capsys.readouterr().out
    predict_text(predictor3, prompt="hi")
    assert "warning" not in capsys.readouterr().out


def test_a_failed_prediction_logs_its_cause(predictor2: Any, capsys: pytest.CaptureFixture) -> None:
    _error(predictor2, prompt="")
    out = capsys.readouterr().out
    assert "stop: failed (InputError: prompt: is empty" in out and "cancelled" not in out
    predict_text(predictor2, prompt="hi", max_tokens=2)
    assert "stop: max_tokens" in capsys.readouterr().out


@pytest.mark.parametrize("name,value,words", [
    ("prompt", 5, "prompt: must be a string, got int"), ("messages", ["x"], "messages: must be a string, got list"),
    ("temperature", "hot", "temperature: must be a number, got 'hot'"),
    ("top_p", None, "top_p: must be a number, got None"), ("repetition_penalty", True, "repetition_penalty: must be a number"),
])
def test_inputs_of_the_wrong_type_without_a_schema(predictor2: Any, name: str, value: Any, words: str) -> None:
    """A runtime that does not check the schema (coglet without .cog/openapi_schema.json) passes any
    JSON value on: predict() refuses it naming the input, instead of failing inside the engine."""
    assert _error(predictor2, **{"prompt": "hi", name: value}).startswith(words)
