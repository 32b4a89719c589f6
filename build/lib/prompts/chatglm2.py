"""The ChatGLM2 chat format: ``[Round N]\\n\\n问：{query}\\n\\n答：{answer}\\n\\n`` rounds.

The whole prompt string is encoded in one piece after ``[gMASK]`` ``sop``; there is no system role.
"""
from __future__ import annotations

from typing import Any

from . import PromptTokenizer, check_messages

STOP_IDS = (2,)
ROLES = ("user", "assistant")
_ROLE_ERRORS = {
    "system": "ChatGLM2 has no system role; put the instructions into the first user message "
              "(or use a ChatGLM3 model)",
    "observation": "ChatGLM2 has no observation role (tool results need a ChatGLM3 model)",
}
_ANSWER = "\n\n答："


def _round_head(n: int) -> str:
    return f"[Round {n}]\n\n问："


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages``: alternating user/assistant turns starting and ending with a user turn.

    Raises ValueError naming the message index and the rule that is broken."""
    msgs = check_messages(messages, ROLES, _ROLE_ERRORS)
    for i, msg in enumerate(msgs):
        expected = ROLES[i % 2]
        if msg["role"] != expected:
            raise ValueError(f"messages[{i}]: role {msg['role']!r} out of order; ChatGLM2 takes alternating "
                             f"user/assistant messages starting with user, so this one must be {expected!r}")
        if msg.get("metadata"):
            raise ValueError(f"messages[{i}]: metadata is not supported by ChatGLM2 (it is a ChatGLM3 field)")
    if msgs[-1]["role"] != "user":
        raise ValueError(f"messages[{len(msgs) - 1}]: the conversation must end with a user message "
                         "(the turn the model answers)")
    return msgs


def build_prompt_text(messages: Any) -> str:
    """The prompt string: one ``[Round N]`` block per past exchange, then the open round."""
    msgs = validate_messages(messages)
    parts = []
    for n, i in enumerate(range(0, len(msgs) - 1, 2), start=1):
        parts.append(f"{_round_head(n)}{msgs[i]['content']}{_ANSWER}{msgs[i + 1]['content']}\n\n")
    parts.append(f"{_round_head(len(msgs) // 2 + 1)}{msgs[-1]['content']}{_ANSWER}")
    return "".join(parts)


def build_input_ids(messages: Any, tokenizer: PromptTokenizer) -> list[int]:
    """``[gMASK] sop`` followed by the ids of the whole prompt string."""
    prefix = [tokenizer.special_id("[gMASK]"), tokenizer.special_id("sop")]
    return prefix + tokenizer.encode(build_prompt_text(messages))


def is_raw_prompt(text: str) -> bool:
    """Whether ``text`` is a complete prompt in this format (used as-is instead of a user message)."""
    return text.startswith(_round_head(1)) and text.endswith("答：")


def parse_raw_prompt(text: str) -> list[dict[str, Any]]:
    """Messages of a raw prompt in this format; building from them reproduces ``text`` exactly."""
    if not is_raw_prompt(text):
        raise ValueError("not a raw ChatGLM2 prompt: it must start with '[Round 1]\\n\\n问：' and end "
                         "with '答：' (send plain text as a user message instead)")
    messages: list[dict[str, Any]] = []
    pos, n = 0, 1
    while True:
        body = pos + len(_round_head(n))
        nxt = text.find("\n\n" + _round_head(n + 1), body)
        if nxt < 0:
            if not text.endswith(_ANSWER) or len(text) - len(_ANSWER) < body:
                raise ValueError(f"raw ChatGLM2 prompt: round {n} must end with '\\n\\n答：' "
                                 "(the point where the model answers)")
            messages.append({"role": "user", "content": text[body:len(text) - len(_ANSWER)]})
            break
        sep = text.find(_ANSWER, body, nxt)
        if sep < 0:
            raise ValueError(f"raw ChatGLM2 prompt: round {n} has no '\\n\\n答：' before [Round {n + 1}]; "
                             "each past round is '[Round N]\\n\\n问：question\\n\\n答：answer\\n\\n'")
        messages.append({"role": "user", "content": text[body:sep]})
        messages.append({"role": "assistant", "content": text[sep + len(_ANSWER):nxt]})
        pos, n = nxt + 2, n + 1
    return messages
