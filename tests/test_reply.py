"""The ChatGLM3 reply parser on crafted model text: a tool call is strict JSON or falls back to its
raw content, never an exception; with no tools in the request nothing is a tool call."""
from __future__ import annotations

import json
from typing import Any

import pytest

from chatglm.text.reply import Chatglm3Reply, ToolCallParseError, parse_tool_call
from tests.predict_helpers import predict_chunks

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")

CRAFTED = [
    pytest.param("tool_call(a={1, 2})", id="set"),
    pytest.param("tool_call(a=b'x')", id="bytes"),
    pytest.param("tool_call(a=1j)", id="complex"),
    pytest.param("tool_call(a=1+2j)", id="complex-sum"),
    pytest.param("tool_call(a={(1, 2): 3})", id="tuple-key"),
    pytest.param("tool_call(a={1: 'x'})", id="int-key"),
    pytest.param("tool_call(a=" + "-" * 3000 + "1)", id="3000-unary-minus"),
    pytest.param("tool_call(a=" + "-" * 100000 + "1)", id="100000-unary-minus"),
    pytest.param("tool_call(a=" + "[" * 5000 + "]" * 5000 + ")", id="deep-list"),
    pytest.param("tool_call(a=" + "[" * 60 + "]" * 60 + ")", id="list-deeper-than-the-bound"),
    pytest.param("tool_call(a=1e999)", id="inf"),
    pytest.param("tool_call(a=-1e999)", id="minus-inf"),
    pytest.param("tool_call(a=[1e999])", id="inf-in-list"),
    pytest.param("tool_call(a='\\ud800')", id="lone-surrogate"),
    pytest.param("tool_call(a={'k': '\\udfff'})", id="lone-surrogate-in-dict"),
    pytest.param("tool_call(a=1" + "0" * 5000 + ")", id="huge-int"),
    pytest.param("tool_call(a='\x00')", id="null-byte"),
    pytest.param("tool_call(a=...)", id="ellipsis"),
    pytest.param("tool_call(a=frozenset())", id="call"),
]


@pytest.mark.parametrize("code", CRAFTED)
def test_crafted_tool_calls_are_a_parse_error(code: str) -> None:
    with pytest.raises(ToolCallParseError):
        parse_tool_call(code)


def _chunks(text: str, tool_calls: bool = True) -> list[str]:
    reply = Chatglm3Reply(tool_calls)
    out = [reply.push(ch) for ch in text] + [reply.finish(), reply.tool_call or ""]
    return [c for c in out if c]


@pytest.mark.parametrize("code", CRAFTED)
def test_crafted_tool_calls_fall_back_to_content_as_strict_json(code: str) -> None:
    chunks = _chunks(f"get_weather\n{code}")
    assert len(chunks) == 1
    chunk = chunks[0]
    chunk.encode("utf-8")  # no lone surrogate: the response can always be encoded
    call = json.loads(chunk, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {chunk[:80]}"))
    assert call["tool_call"]["name"] == "get_weather"
    assert "arguments" not in call["tool_call"]
    assert isinstance(call["tool_call"]["content"], str)


def test_valid_arguments_are_json_values() -> None:
    assert parse_tool_call("tool_call(t=(1, 2), d={'a': [None, True, 2.5]}, s='北京')") == \
        {"t": [1, 2], "d": {"a": [None, True, 2.5]}, "s": "北京"}
    chunk = _chunks("f\ntool_call(x=1.5e300, y=-0.0)")[0]
    assert json.loads(chunk) == {"tool_call": {"name": "f", "arguments": {"x": 1.5e300, "y": -0.0}}}


@pytest.mark.parametrize("text", ["get_weather\ntool_call(city='北京')", "Sure\nhere it is", "a\n\nb"])
def test_without_tools_an_answer_is_never_a_tool_call(text: str) -> None:
    assert "".join(_chunks(text, tool_calls=False)) == text
    assert "".join(_chunks("\n" + text, tool_calls=False)) == text  # the empty metadata line is dropped


def test_without_tools_through_predict(predictor3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short first line and a newline from a model asked without tools is plain text."""
    pipe = predictor3.pipe
    text = "get_current_weather\n```python\ntool_call(location='北京')\n```"
    ids = pipe.tokenizer.encode(text)
    monkeypatch.setattr(pipe, "_generate", lambda *args, **kwargs: iter(ids))
    assert "".join(predict_chunks(predictor3, prompt="北京天气怎么样")) == pipe.tokenizer.decode(ids)
    tools = json.dumps([{"name": "get_current_weather"}])
    with_tools = predict_chunks(predictor3, prompt="北京天气怎么样", tools=tools)
    assert json.loads(with_tools[-1])["tool_call"]["arguments"] == {"location": "北京"}
