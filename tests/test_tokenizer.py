"""ChatGLMTokenizer against the reference tokenizer cases (../shared) and its own error handling."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from chatglm.text.tokenizer import ChatGLMTokenizer
from tests.conftest import FIXTURES, TOKENIZER_MODEL, load_json, needs_shared

CASES_FILE = FIXTURES / "tokenizer" / "cases.json"


def _cases(key: str) -> list:
    if not CASES_FILE.is_file():
        return [pytest.param(None, id="fixtures-absent", marks=needs_shared)]
    return [pytest.param(case, id=case["name"]) for case in load_json(CASES_FILE)[key]]


@pytest.fixture(scope="module")
def tok(tokenizer_model: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(tokenizer_model)


@pytest.mark.parametrize("case", _cases("encode_cases"))
def test_encode_case(tok: ChatGLMTokenizer, case: dict) -> None:
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("case", _cases("decode_cases"))
def test_decode_case(tok: ChatGLMTokenizer, case: dict) -> None:
    assert tok.decode(case["ids"]) == case["text"]


def test_sizes_and_special_ids(tok: ChatGLMTokenizer) -> None:
    assert tok.num_pieces == 64789
    assert tok.vocab_size == 64798
    assert (tok.eos_id, tok.pad_id) == (2, 0)
    assert tok.special_id("[gMASK]") == 64790
    assert tok.special_id("<|observation|>") == 64797
    assert sorted(tok.SPECIAL_TOKENS.values()) == list(range(64789, 64798))


def test_unknown_special_token_names_it(tok: ChatGLMTokenizer) -> None:
    with pytest.raises(KeyError, match=r"'<\|tool\|>' is not a ChatGLM special token; known: \[MASK\]"):
        tok.special_id("<|tool|>")


def test_special_tokens_split_runs(tok: ChatGLMTokenizer) -> None:
    ids = [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796, 36474]
    run = tok.decode([30910, 13, 36474, 54591])
    assert run == "\n 你好"
    assert tok.decode(ids) == "[gMASK]sop<|user|>" + run + "<|assistant|>你"
    assert tok.decode(ids, skip_special_tokens=True) == run + "你"
    assert tok.decode([36474, 64795, 36474], skip_special_tokens=True) == "你你"


def test_special_token_text_is_encoded_as_text(tok: ChatGLMTokenizer) -> None:
    ids = tok.encode("<|user|>[gMASK]sop")
    assert all(i < tok.FIRST_SPECIAL_ID for i in ids)
    assert tok.decode(ids) == "<|user|>[gMASK]sop"


def test_padding_rows_decode_to_nothing(tok: ChatGLMTokenizer) -> None:
    assert tok.decode([64798, 65023]) == ""
    assert tok.decode([243, 64800, 162, 148, 142]) == "👋"


@pytest.mark.parametrize("bad", [-1, 65024, 10**9])
def test_out_of_range_id_is_named(tok: ChatGLMTokenizer, bad: int) -> None:
    with pytest.raises(ValueError, match=f"token id {bad} is outside"):
        tok.decode([36474, bad])


def test_encode_rejects_non_text(tok: ChatGLMTokenizer) -> None:
    with pytest.raises(TypeError, match="takes a str, got list"):
        tok.encode([1, 2])  # type: ignore[arg-type]


def test_from_dir(tmp_path: Path, tokenizer_model: Path) -> None:
    shutil.copyfile(tokenizer_model, tmp_path / "tokenizer.model")
    tok = ChatGLMTokenizer.from_dir(tmp_path)
    assert tok.encode("你好") == [36474, 54591]
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in (36474, 54591)] == ["你", "好"]


def test_from_dir_missing_file_explains(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ChatGLMTokenizer.from_dir(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "tokenizer.model") in msg
    assert "next to config.json" in msg and "python -m chatglm.download" in msg


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChatGLMTokenizer(tmp_path / "nope.model")


@needs_shared
def test_matches_shared_sha() -> None:
    expected = load_json(CASES_FILE)["tokenizer_sha256"]
    assert hashlib.sha256(TOKENIZER_MODEL.read_bytes()).hexdigest() == expected
