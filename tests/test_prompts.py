"""Prompt formats against the reference prompt cases (../shared), raw prompts and validation."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import prompts
from chatglm.text.tokenizer import ChatGLMTokenizer
from prompts import chatglm2, chatglm3
from tests.conftest import FIXTURES, load_json, needs_shared

CASES_FILE = FIXTURES / "prompts" / "cases.json"
MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def _cases(family: str, multi_turn: bool = False) -> list:
    if not CASES_FILE.is_file():
        return [pytest.param(None, id="fixtures-absent", marks=needs_shared)]
    cases = [c for c in load_json(CASES_FILE)["cases"] if c["family"] == family]
    if multi_turn:
        cases = [c for c in cases if len(c["messages"]) > 1]
    return [pytest.param(c, id=c["name"]) for c in cases]


@pytest.fixture(scope="module")
def tok(tokenizer_model: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(tokenizer_model)


class CharTokenizer:
    """A stand-in tokenizer (one id per character) for tests that need no tokenizer.model."""

    SPECIAL = {"[gMASK]": -1, "sop": -2, "<|system|>": -3, "<|user|>": -4, "<|assistant|>": -5,
               "<|observation|>": -6}

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def special_id(self, token: str) -> int:
        return self.SPECIAL[token]


def chatglm3_raw_text(messages: list[dict]) -> str:
    """The raw ChatGLM3 prompt text of ``messages`` (the format published services accept)."""
    parts = [f"<|{m['role']}|>{m.get('metadata', '')}\n{chatglm3.message_content(m)}" for m in messages]
    return "".join(parts) + "<|assistant|>"


@pytest.mark.parametrize("case", _cases("chatglm2"))
def test_chatglm2_case(tok: ChatGLMTokenizer, case: dict) -> None:
    assert chatglm2.build_prompt_text(case["messages"]) == case["prompt_text"]
    assert chatglm2.build_input_ids(case["messages"], tok) == case["input_ids"]
    assert len(case["input_ids"]) == case["num_tokens"]


@pytest.mark.parametrize("case", _cases("chatglm3"))
def test_chatglm3_case(tok: ChatGLMTokenizer, case: dict) -> None:
    assert chatglm3.build_input_ids(case["messages"], tok) == case["input_ids"]


@pytest.mark.parametrize("case", _cases("chatglm2", multi_turn=True))
def test_chatglm2_raw_prompt_round_trip(tok: ChatGLMTokenizer, case: dict) -> None:
    raw = case["prompt_text"]
    assert chatglm2.is_raw_prompt(raw)
    messages = chatglm2.parse_raw_prompt(raw)
    assert messages == case["messages"]
    assert chatglm2.build_input_ids(messages, tok) == case["input_ids"] == [64790, 64792] + tok.encode(raw)


@pytest.mark.parametrize("case", _cases("chatglm3", multi_turn=True))
def test_chatglm3_raw_prompt_round_trip(tok: ChatGLMTokenizer, case: dict) -> None:
    texts = [chatglm3.message_content(m) + m.get("metadata", "") for m in case["messages"]]
    if any(marker in text for text in texts for marker in MARKERS):
        # Literal role markers in contents cannot be expressed in raw text: they start new messages.
        with pytest.raises(ValueError, match="has no newline"):
            chatglm3.parse_raw_prompt(chatglm3_raw_text(case["messages"]))
        return
    raw = chatglm3_raw_text(case["messages"])
    assert chatglm3.is_raw_prompt(raw)
    messages = chatglm3.parse_raw_prompt(raw)
    assert chatglm3.build_input_ids(messages, tok) == case["input_ids"]
    assert chatglm3.build_input_ids(chatglm3.parse_raw_prompt(raw[:-len("<|assistant|>")]), tok) \
        == case["input_ids"]


def test_chatglm3_raw_prompt_fields() -> None:
    raw = ("<|system|>\nYou are a bot.<|user|>\n北京天气？<|assistant|>get_weather\n"
           "```python\ntool_call(city='北京')\n```<|observation|>\n{\"t\": 22}<|assistant|>")
    assert chatglm3.parse_raw_prompt(raw) == [
        {"role": "system", "content": "You are a bot."},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
        {"role": "observation", "content": "{\"t\": 22}"},
    ]
    fake = CharTokenizer()
    ids = chatglm3.build_input_ids(chatglm3.parse_raw_prompt(raw), fake)
    assert ids[:3] == [-1, -2, -3] and ids[-1] == -5


def test_chatglm3_tools_in_raw_text_round_trip() -> None:
    tools = [{"name": "f", "description": "描述", "parameters": {"type": "object"}}]
    messages = [{"role": "system", "content": "Tools:", "tools": tools},
                {"role": "user", "content": "hi\n\nthere"}]
    parsed = chatglm3.parse_raw_prompt(chatglm3_raw_text(messages))
    assert parsed[0]["content"] == "Tools:\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    fake = CharTokenizer()
    assert chatglm3.build_input_ids(parsed, fake) == chatglm3.build_input_ids(messages, fake)


@pytest.mark.parametrize("raw, match", [
    ("hello <|user|>\nhi<|assistant|>", r"text before the first role marker: 'hello '"),
    ("[gMASK]sop<|user|>\nhi", r"\[gMASK\]sop is added automatically"),
    ("<|user|>hi<|assistant|>", r"message 0 \(<\|user\|> at character 0\) has no newline"),
    ("<|user|>\nhi<|assistant|>\nanswer", r"messages\[1\]: the conversation must end with a user or "
                                          r"observation message"),
    ("just text", "no <|system|>, <|user|>, <|assistant|> or <|observation|> marker"),
    ("<|assistant|>", "no messages before the final <|assistant|>"),
])
def test_chatglm3_raw_prompt_errors(raw: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chatglm3.parse_raw_prompt(raw)


def test_is_raw_prompt() -> None:
    assert chatglm3.is_raw_prompt("<|user|>\nhi<|assistant|>")
    assert not chatglm3.is_raw_prompt("what is <|user ?")
    assert chatglm2.is_raw_prompt("[Round 1]\n\n问：你好\n\n答：")
    assert not chatglm2.is_raw_prompt("[Round 1]\n\n问：你好")
    assert not chatglm2.is_raw_prompt("你好\n\n答：")


def test_chatglm2_parse_with_fake_tokenizer() -> None:
    messages = [{"role": "user", "content": "q1\n\n答：x"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": ""}]
    raw = chatglm2.build_prompt_text(messages)
    assert raw == "[Round 1]\n\n问：q1\n\n答：x\n\n答：a1\n\n[Round 2]\n\n问：\n\n答："
    parsed = chatglm2.parse_raw_prompt(raw)
    assert chatglm2.build_prompt_text(parsed) == raw
    fake = CharTokenizer()
    assert chatglm2.build_input_ids(parsed, fake) == [-1, -2] + fake.encode(raw)


@pytest.mark.parametrize("raw, match", [
    ("hello", "not a raw ChatGLM2 prompt"),
    ("[Round 1]\n\n问：你好答：", r"round 1 must end with '\\n\\n答：'"),
    ("[Round 1]\n\n问：a\n\n[Round 2]\n\n问：b\n\n答：", r"round 1 has no '\\n\\n答：' before \[Round 2\]"),
])
def test_chatglm2_raw_prompt_errors(raw: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chatglm2.parse_raw_prompt(raw)


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("family, messages, match", [
    ("chatglm3", [], "messages is empty"),
    ("chatglm3", "hi", "messages must be a list of message dicts, got str"),
    ("chatglm3", [USER, "hi"], r"messages\[1\]: must be a dict"),
    ("chatglm3", [{"content": "x"}], r"messages\[0\]: 'role' is missing"),
    ("chatglm3", [USER, ASSISTANT, {"role": "robot", "content": "x"}],
     r"messages\[2\]: role 'robot' is not one of system, user, assistant, observation"),
    ("chatglm3", [{"role": "user"}], r"messages\[0\]: 'content' is missing"),
    ("chatglm3", [{"role": "user", "content": None}], r"messages\[0\]: content must be a string, got NoneType"),
    ("chatglm3", [{"role": "user", "content": "x", "metadata": 3}], r"messages\[0\]: metadata must be a string"),
    ("chatglm3", [{"role": "user", "content": "x", "tools": []}],
     r"messages\[0\]: tools are only allowed on system messages, not on 'user'"),
    ("chatglm3", [{"role": "system", "content": "x", "tools": {"name": "f"}}, USER],
     r"messages\[0\]: tools must be a list"),
    ("chatglm3", [USER, ASSISTANT], r"messages\[1\]: the conversation must end with a user or observation"),
    ("chatglm2", [{"role": "system", "content": "x"}, USER], r"messages\[0\]: ChatGLM2 has no system role"),
    ("chatglm2", [USER, ASSISTANT, {"role": "observation", "content": "x"}],
     r"messages\[2\]: ChatGLM2 has no observation role"),
    ("chatglm2", [{"role": "robot", "content": "x"}], r"messages\[0\]: role 'robot' is not one of user, assistant"),
    ("chatglm2", [USER, USER], r"messages\[1\]: role 'user' out of order; .* must be 'assistant'"),
    ("chatglm2", [ASSISTANT, USER], r"messages\[0\]: role 'assistant' out of order"),
    ("chatglm2", [USER, ASSISTANT], r"messages\[1\]: the conversation must end with a user message"),
    ("chatglm2", [{"role": "user", "content": "x", "metadata": "m"}], r"messages\[0\]: metadata is not supported"),
    ("chatglm2", [{"role": ["user"], "content": "x"}], r"messages\[0\]: role must be a string, got list"),
    ("chatglm3", [{"role": {"a": 1}, "content": "x"}], r"messages\[0\]: role must be a string, got dict"),
    ("chatglm3", [{"role": "x" * 10000, "content": "x"}], r"messages\[0\]: role 'x{40}'\.\.\. is not one of"),
])
def test_validation_errors(family: str, messages: object, match: str) -> None:
    fmt = prompts.get_format(family)
    with pytest.raises(ValueError, match=match):
        fmt.validate_messages(messages)
    with pytest.raises(ValueError, match=match):
        fmt.build_input_ids(messages, CharTokenizer())


def test_validation_accepts_and_does_not_modify() -> None:
    messages = [{"role": "system", "content": "s", "tools": []}, USER,
                {"role": "assistant", "metadata": "f", "content": "x"}, {"role": "observation", "content": "{}"}]
    before = copy.deepcopy(messages)
    assert chatglm3.validate_messages(messages) == before
    assert chatglm3.build_input_ids(messages, CharTokenizer())[-1] == -5
    assert messages == before


def test_get_format() -> None:
    assert prompts.get_format("chatglm2") is chatglm2
    assert prompts.get_format("chatglm3") is chatglm3
    with pytest.raises(ValueError, match="unknown prompt format 'chatglm4'; allowed values: chatglm2, chatglm3"):
        prompts.get_format("chatglm4")


def test_stop_ids() -> None:
    assert chatglm2.STOP_IDS == (2,)
    assert chatglm3.STOP_IDS == (2, 64795, 64797)


@needs_shared
@pytest.mark.parametrize("model, fmt", [("chatglm2-int4-tiny", chatglm2), ("chatglm3-32k-tiny", chatglm3)])
def test_stop_ids_match_fixture_models(model: str, fmt: object) -> None:
    expected = load_json(FIXTURES / "models" / model / "expected.json")["stop_token_ids"]
    assert list(fmt.STOP_IDS) == expected
