"""Chat prompt formats: messages -> prompt token ids, one module per model family.

Every format module provides ``validate_messages``, ``build_input_ids``, ``parse_raw_prompt``,
``is_raw_prompt`` and ``STOP_IDS``. The tokenizer is passed in (anything with ``encode(text)`` and
``special_id(token)``), so this package does not depend on :mod:`chatglm`.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping, Protocol, Sequence

FAMILIES = ("chatglm2", "chatglm3")
ALL_ROLES = ("system", "user", "assistant", "observation")


class PromptTokenizer(Protocol):
    """What the prompt builders need from a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Plain token ids of ``text``."""

    def special_id(self, token: str) -> int:
        """Id of a special token such as ``"[gMASK]"``."""


def get_format(family: str) -> ModuleType:
    """The prompt format module for ``family`` ("chatglm2" or "chatglm3")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown prompt format {family!r}; allowed values: {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{family}")


def check_messages(messages: Any, roles: Sequence[str],
                   role_errors: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Checks shared by all formats; returns ``messages`` as a list.

    ``messages`` must be a non-empty list of dicts, each with a ``role`` from ``roles`` and a string
    ``content``; ``metadata`` (optional) must be a string; ``tools`` is allowed on system messages
    only and must be a list. ``role_errors`` gives a dedicated error for a role the format lacks.
    Raises ValueError naming the message index and the rule.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: it needs at least one user message")
    role_errors = role_errors or {}
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ValueError(f"{where}: must be a dict with 'role' and 'content', got {type(msg).__name__}")
        if "role" not in msg:
            raise ValueError(f"{where}: 'role' is missing; use one of {', '.join(roles)}")
        role = msg["role"]
        if not isinstance(role, str):
            raise ValueError(f"{where}: role must be a string, got {type(role).__name__}; use one of "
                             f"{', '.join(roles)}")
        if role in role_errors:
            raise ValueError(f"{where}: {role_errors[role]}")
        if role not in roles:
            shown = repr(role) if len(role) <= 40 else repr(role[:40]) + "..."
            raise ValueError(f"{where}: role {shown} is not one of {', '.join(roles)}")
        if "content" not in msg:
            raise ValueError(f"{where}: 'content' is missing; every message needs a string content "
                             "(use \"\" for an empty one)")
        if not isinstance(msg["content"], str):
            raise ValueError(f"{where}: content must be a string, got {type(msg['content']).__name__}")
        if "metadata" in msg and not isinstance(msg["metadata"], str):
            raise ValueError(f"{where}: metadata must be a string, got {type(msg['metadata']).__name__}")
        if "tools" in msg:
            if role != "system":
                raise ValueError(f"{where}: tools are only allowed on system messages, not on {role!r}")
            if not isinstance(msg["tools"], list):
                raise ValueError(f"{where}: tools must be a list of tool descriptions, "
                                 f"got {type(msg['tools']).__name__}")
    return list(messages)
