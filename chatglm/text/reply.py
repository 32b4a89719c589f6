"""Turns the raw text a chat model generates into the reply a caller sees.

ChatGLM3 starts every assistant turn with a metadata line: empty for an ordinary answer, a tool's
name for a tool call (followed by a ```python block holding ``tool_call(name=value, ...)``). Tool calls
are parsed with :mod:`ast` (literal values only), never evaluated.
"""
from __future__ import annotations

import ast
import json
import math
from typing import Any


class ToolCallParseError(ValueError):
    pass


MAX_ARGUMENT_DEPTH = 32
"""Deepest nesting of lists and objects accepted in a tool call's arguments."""


def parse_tool_call(code: str) -> dict[str, Any]:
    """Arguments of ``tool_call(a=1, b="x")`` as a dict of JSON values; only literal values are
    accepted. Any other text (including what Python cannot parse, such as thousands of nested
    operators) is a ToolCallParseError, never another exception."""
    text = code.strip()
    if text.startswith("```"):
        lines = text.split("\n")
        text = "\n".join(lines[1:-1] if lines[-1].strip().startswith("```") else lines[1:])
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolCallParseError(f"not a tool_call(...) expression: {exc.msg}") from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise ToolCallParseError(f"not a tool_call(...) expression: {type(exc).__name__}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ToolCallParseError("expected a single tool_call(...) expression")
    if call.args:
        raise ToolCallParseError("tool_call takes keyword arguments only")
    args: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ToolCallParseError("tool_call(**kwargs) is not allowed")
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ToolCallParseError(f"argument {kw.arg!r} is not a literal value") from None
        args[kw.arg] = json_value(value, kw.arg)
    return args


def json_value(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` as strict JSON data (tuples become lists); ToolCallParseError for what JSON cannot
    hold: sets, bytes, complex numbers, non-string keys, inf and NaN, lone surrogates, deep nesting."""
    if depth > MAX_ARGUMENT_DEPTH:
        raise ToolCallParseError(f"argument {where!r} is nested deeper than {MAX_ARGUMENT_DEPTH}")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolCallParseError(f"argument {where!r} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise ToolCallParseError(f"argument {where!r} holds a lone surrogate, which is not text")
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ToolCallParseError(f"argument {where!r} has an object key that is not a string")
        return {json_value(k, where, depth + 1): json_value(v, where, depth + 1) for k, v in value.items()}
    raise ToolCallParseError(f"argument {where!r} is a {type(value).__name__}, which JSON cannot hold")


def tool_call_chunk(call: dict[str, Any]) -> str:
    """The one JSON chunk ``{"tool_call": call}``: strict JSON (no NaN or Infinity) and valid text."""
    return json.dumps({"tool_call": call}, ensure_ascii=False, allow_nan=False)


MAX_METADATA_CHARS = 100
"""A first line longer than this is not a tool name: the text is streamed as an ordinary answer."""


class PlainReply:
    """ChatGLM2: the generated text is the reply (leading whitespace dropped, like the official chat)."""

    def __init__(self):
        self._started = False

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    def finish(self) -> str:
        return ""

    tool_call: str | None = None


class Chatglm3Reply:
    """ChatGLM3: hold text until the metadata line ends; an empty one starts a streamed answer, a
    tool name starts a tool call that :meth:`finish` turns into one JSON string in ``tool_call``.

    With ``tool_calls`` False (the request gave no tools) nothing is ever a tool call: a non-empty
    first line is part of the answer."""

    def __init__(self, tool_calls: bool = True):
        self._tool_calls = tool_calls
        self._head = ""
        self._mode: str | None = None  # None (reading metadata), "text" or "tool"
        self._answer = PlainReply()
        self.tool_call: str | None = None

    def push(self, text: str) -> str:
        if self._mode == "text":
            return self._answer.push(text)
        self._head += text
        if self._mode is None and "\n" not in self._head and len(self._head) > MAX_METADATA_CHARS:
            self._mode, head, self._head = "text", self._head, ""
            return self._answer.push(head)
        if self._mode == "tool" or "\n" not in self._head:
            return ""
        metadata, rest = self._head.split("\n", 1)
        if metadata.strip() and not self._tool_calls:
            self._mode, head, self._head = "text", self._head, ""
            return self._answer.push(head)
        if metadata.strip():
            self._mode = "tool"
            return ""
        self._mode, self._head = "text", ""
        return self._answer.push(rest)

    def finish(self) -> str:
        """Text still held at the end of the stream; a tool call is left in ``tool_call`` instead."""
        if self._mode == "text":
            return ""
        if self._mode is None:
            return self._answer.push(self._head)
        metadata, content = self._head.split("\n", 1)
        call: dict[str, Any] = {"name": _text(metadata.strip())}
        try:
            call["arguments"] = parse_tool_call(content)
        except ToolCallParseError:
            call["content"] = _text(content.strip())
        self.tool_call = tool_call_chunk(call)
        return ""


def _text(value: str) -> str:
    """``value`` with any lone surrogate replaced by U+FFFD, so that it can be encoded."""
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if any(
        "\ud800" <= ch <= "\udfff" for ch in value) else value
