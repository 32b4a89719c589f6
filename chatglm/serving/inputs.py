"""Turns the service's string inputs (prompt, messages JSON, tools JSON, stop sequences) into a
request for :class:`~chatglm.pipeline.Pipeline`. Every error names the input and the rule."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..text.stops import check_stop_bounds

MAX_JSON_DEPTH = 64
"""Deepest nesting of lists and objects accepted in the messages and tools JSON (a tool's JSON
schema nests a few levels; thousands would exhaust the parser's stack)."""
LONG_CONTEXT_FAMILY = "chatglm3-32k"
TOOLS_ON_32K_WARNING = ("tools: ChatGLM3-6B-32K was not trained for tool calls, so its tool calls are "
                        "unreliable; use ChatGLM3-6B for tools")
DEFAULT_TOOLS_SYSTEM = ("Answer the following questions as best as you can. "
                        "You have access to the following tools:")


class InputError(ValueError):
    """A prediction input breaks a rule; the message names the input."""


@dataclass
class ChatRequest:
    messages: list[dict]
    stop_sequences: list[str]
    warnings: list[str] = field(default_factory=list)  # for the prediction's logs


def parse_stop_sequences(text: str) -> list[str]:
    """Comma-separated stop texts (each stripped of surrounding spaces, empty ones dropped), or a JSON
    list of strings for texts that contain commas or must keep their spaces."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"stop_sequences: starts with '[' but is not a JSON list of strings ({exc.msg})") from None
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise InputError("stop_sequences: a JSON value must be a list of strings")
        stops = [s for s in value if s]
    else:
        stops = [s.strip() for s in text.split(",") if s.strip()]
    try:
        check_stop_bounds(stops)
    except ValueError as exc:
        raise InputError(f"stop_sequences: {exc}") from None
    return stops


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def check_json_depth(name: str, text: str) -> None:
    """InputError when the JSON ``text`` nests lists and objects deeper than MAX_JSON_DEPTH; found by
    scanning the brackets outside strings, before any parser recurses into it."""
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise InputError(f"{name}: nested more than {MAX_JSON_DEPTH} lists or objects deep; "
                             "flatten the structure")


def integer_input(name: str, value: Any) -> Any:
    """An integer input as an int: a whole float such as ``4.0`` (which JSON Schema counts as an
    integer, so coglet passes it on as a float) becomes 4; anything else that is not an int is an
    InputError. None is kept (an optional input left empty)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    raise InputError(f"{name}: must be an integer, got {shown}")


def check_min_tokens(min_tokens: int, max_tokens: int) -> None:
    """``min_tokens`` cannot exceed ``max_tokens`` (the answer could never end)."""
    if min_tokens > max_tokens:
        raise InputError(f"min_tokens: must be at most max_tokens, got min_tokens={min_tokens} > max_tokens={max_tokens}")


def number_input(name: str, value: Any) -> float:
    """A number input as a float; InputError for anything else (a runtime without the input schema,
    such as coglet without .cog/openapi_schema.json, passes inputs on unchecked)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    raise InputError(f"{name}: must be a number, got {shown}")


def _find_surrogate(value: Any, path: str) -> tuple[str, int, str] | None:
    """The first lone surrogate (half of a UTF-16 pair, not a character) in the strings of ``value``:
    ``(path, index, char)``, or None. They come from JSON escapes such as ``"\\ud800"``."""
    if isinstance(value, str):
        for i, ch in enumerate(value):
            if "\ud800" <= ch <= "\udfff":
                return path, i, ch
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _find_surrogate(key, path) or _find_surrogate(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


def check_unicode(name: str, value: Any) -> None:
    """Raise InputError when a string in ``value`` holds a lone surrogate, which no tokenizer (and no
    UTF-8 encoder) accepts; the message names the input, the position and the code point."""
    found = _find_surrogate(value, name)
    if found:
        path, index, ch = found
        raise InputError(f"{path}: contains a lone surrogate U+{ord(ch):04X} at character {index}, which is "
                         "not valid Unicode text; send UTF-8 text (a JSON \\uD83D\\uDE00 escape pair is fine, "
                         "half of one is not)")


def _json_list(name: str, text: str) -> list:
    check_json_depth(name, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, list):
        raise InputError(f"{name}: must be a JSON list, got a JSON {type(value).__name__}")
    return value


def build_request(pipe, prompt: str, system_prompt: str = "", messages: str = "", tools: str = "",
                  stop_sequences: str = "") -> ChatRequest:
    """Combine the inputs into messages for ``pipe`` (a Pipeline); validation errors are InputError.

    The caller's conversation is checked before the system prompt and tools are added to it, so an
    error names the message index the caller sent."""
    chatglm3 = pipe.format_name == "chatglm3"
    for name, text in (("prompt", prompt), ("system_prompt", system_prompt), ("messages", messages),
                       ("tools", tools), ("stop_sequences", stop_sequences)):
        if not isinstance(text, str):
            raise InputError(f"{name}: must be a string, got {type(text).__name__}")
        check_unicode(name, text)
    source = "messages" if messages.strip() else "prompt"
    if messages.strip():
        if prompt.strip():
            raise InputError("prompt and messages: give one of them, not both (messages holds the whole conversation)")
        convo = _json_list("messages", messages)
        check_unicode("messages", convo)
        if not convo:
            raise InputError("messages: the list is empty; give at least one user message")
        for i, m in enumerate(convo):
            if not isinstance(m, dict):
                raise InputError(f"messages[{i}]: must be an object with 'role' and 'content', got {type(m).__name__}")
    else:
        if not prompt.strip():
            raise InputError("prompt: is empty; give a prompt (or a messages list)")
        try:
            convo = pipe.messages_from_prompt(prompt)
        except ValueError as exc:
            raise InputError(f"prompt: {exc}") from None
    _validate(pipe, convo, source)
    convo = [dict(m) for m in convo]
    tool_list = None
    if tools.strip():
        if not chatglm3:
            raise InputError("tools: tool calling needs a ChatGLM3 model; this one is ChatGLM2")
        tool_list = _json_list("tools", tools)
        check_unicode("tools", tool_list)
        for i, tool in enumerate(tool_list):
            if not isinstance(tool, dict):
                raise InputError(f"tools[{i}]: must be a JSON object (a tool definition with a name), "
                                 f"got a JSON {type(tool).__name__}")
    if system_prompt or tool_list is not None:
        convo = _with_system(convo, system_prompt, tool_list, chatglm3)
        _validate(pipe, convo, "system_prompt" if tool_list is None else "tools")
    stops = parse_stop_sequences(stop_sequences)
    check_unicode("stop_sequences", stops)
    warnings = []
    if pipe.family == LONG_CONTEXT_FAMILY and any("tools" in m for m in convo):
        warnings.append(TOOLS_ON_32K_WARNING)
    return ChatRequest(convo, stops, warnings)


def _validate(pipe, convo: list, source: str) -> None:
    try:
        pipe.format.validate_messages(convo)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None


def _with_system(convo: list[dict], system_prompt: str, tools: list | None, chatglm3: bool) -> list[dict]:
    if not chatglm3:
        # ChatGLM2 has no system role: the system prompt leads the first user turn.
        first = next((i for i, m in enumerate(convo) if m.get("role") == "user"), None)
        if first is None:
            raise InputError("system_prompt: the conversation has no user message to attach it to")
        convo[first]["content"] = f"{system_prompt}\n\n{convo[first].get('content', '')}"
        return convo
    if convo and convo[0].get("role") == "system":
        if system_prompt:
            raise InputError("system_prompt: the conversation already starts with a system message; give one or the other")
        if tools is not None:
            convo[0]["tools"] = tools
        return convo
    system: dict = {"role": "system", "content": system_prompt or DEFAULT_TOOLS_SYSTEM}
    if tools is not None:
        system["tools"] = tools
    return [system] + convo
