"""The ChatGLM3 chat format: role tokens, a metadata line, then the content of each message.

``[gMASK] sop``, then per message ``<|role|>`` + ids of ``metadata + "\\n"`` + ids of the content,
and a final bare ``<|assistant|>`` where the model starts its reply.
"""
from __future__ import annotations

import json
import re
from typing import Any

from . import ALL_ROLES, PromptTokenizer, check_messages

STOP_IDS = (2, 64795, 64797)
ROLES = ALL_ROLES
_MARKER = re.compile(r"<\|(system|user|assistant|observation)\|>")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages``: known roles, string fields, tools only on system messages, and a last
    message from the user or an observation. Raises ValueError naming the index and the rule."""
    msgs = check_messages(messages, ROLES)
    last = msgs[-1]["role"]
    if last not in ("user", "observation"):
        raise ValueError(f"messages[{len(msgs) - 1}]: the conversation must end with a user or observation "
                         f"message (the turn the model answers), not {last!r}")
    return msgs


def message_content(message: dict[str, Any]) -> str:
    """The content as encoded: a system message's tools are appended as indented JSON."""
    content = message["content"]
    if "tools" in message:
        content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
    return content


def build_input_ids(messages: Any, tokenizer: PromptTokenizer) -> list[int]:
    """Prompt ids for ``messages``, ending with the bare ``<|assistant|>`` id."""
    msgs = validate_messages(messages)
    ids = [tokenizer.special_id("[gMASK]"), tokenizer.special_id("sop")]
    for msg in msgs:
        ids.append(tokenizer.special_id(f"<|{msg['role']}|>"))
        ids += tokenizer.encode(msg.get("metadata", "") + "\n")
        ids += tokenizer.encode(message_content(msg))
    ids.append(tokenizer.special_id("<|assistant|>"))
    return ids


def is_raw_prompt(text: str) -> bool:
    """Whether ``text`` contains a literal role marker such as ``<|user|>`` (a raw prompt)."""
    return _MARKER.search(text) is not None


def parse_raw_prompt(text: str) -> list[dict[str, Any]]:
    """Messages of a raw prompt such as ``"<|system|>\\nYou are...<|user|>\\n你好<|assistant|>"``.

    After each marker the text up to the first newline is the metadata, the rest up to the next
    marker is the content. A trailing bare ``<|assistant|>`` marks where the model answers (it may
    be left out). Content cannot contain marker text, since it would start a new message.
    """
    marks = list(_MARKER.finditer(text))
    if not marks:
        raise ValueError("not a raw ChatGLM3 prompt: no <|system|>, <|user|>, <|assistant|> or "
                         "<|observation|> marker found (send plain text as a user message instead)")
    if marks[0].start() > 0:
        before = text[:marks[0].start()]
        raise ValueError(f"raw ChatGLM3 prompt: text before the first role marker: {before[:40]!r}; "
                         "the prompt must start with a marker such as <|user|> "
                         "([gMASK]sop is added automatically)")
    stop = len(text)
    if marks[-1].group(1) == "assistant" and marks[-1].end() == len(text):
        stop = marks.pop().start()
    messages: list[dict[str, Any]] = []
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else stop
        segment = text[mark.end():end]
        if "\n" not in segment:
            raise ValueError(f"raw ChatGLM3 prompt: message {k} ({mark.group(0)} at character "
                             f"{mark.start()}) has no newline; "
                             f"write {mark.group(0)}{{metadata}}\\n{{content}} "
                             "(the metadata line is usually empty)")
        metadata, content = segment.split("\n", 1)
        msg: dict[str, Any] = {"role": mark.group(1), "content": content}
        if metadata:
            msg["metadata"] = metadata
        messages.append(msg)
    if not messages:
        raise ValueError("raw ChatGLM3 prompt has no messages before the final <|assistant|>")
    return validate_messages(messages)
