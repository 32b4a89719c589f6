"""StreamDecoder (ids -> text deltas) and StopSequenceMatcher."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm

from chatglm.text.stops import StopSequenceMatcher
from chatglm.text.stream import INCOMPLETE, INVALID, utf8_char_status
from chatglm.text.tokenizer import ChatGLMTokenizer
from tests.conftest import FIXTURES, load_json

FFFD = "\ufffd"
SPECIAL_IDS = list(range(64789, 64798))


@pytest.fixture(scope="module")
def tok(tokenizer_model: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory) -> ChatGLMTokenizer:
    """A tiny byte-fallback SentencePiece model trained here, so these tests need no ../shared."""
    words = ("the quick brown fox jumps over a lazy dog hello world stream decoder token "
             "你好 世界 今天 天气 很 好 我们 模型").split()
    rng = random.Random(7)
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    out = tmp_path_factory.mktemp("tiny_spm")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tiny"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2)
    return ChatGLMTokenizer(out / "tiny.model")


def stream_checked(tok: ChatGLMTokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    """Push ``ids`` one by one, checking after every push that the emitted text is a prefix of the
    decoded ids so far and that only an incomplete character (<= 3 byte ids, shown as U+FFFD by a
    full decode) is held back; then check the invariant with flush()."""
    dec = tok.stream_decoder(skip_special_tokens=skip)
    deltas: list[str] = []
    emitted = ""
    for n, token_id in enumerate(ids, start=1):
        delta = dec.push(token_id)
        deltas.append(delta)
        emitted += delta
        so_far = tok.decode(ids[:n], skip_special_tokens=skip)
        assert so_far.startswith(emitted), (ids[:n], emitted, so_far)
        assert len(dec.held_ids) <= 3
        assert so_far[len(emitted):] == FFFD * len(dec.held_ids), (ids[:n], emitted, so_far)
    tail = dec.flush()
    full = tok.decode(ids, skip_special_tokens=skip)
    assert emitted + tail == full, (ids, deltas, tail, full)
    pos = 0
    for delta in deltas:
        for j, ch in enumerate(delta):
            assert ch != FFFD or full[pos + j] == FFFD
        pos += len(delta)
    return deltas, tail


STREAM_TEXTS = {
    "chinese": "今天天气怎么样？我想去公园散步。床前明月光，疑是地上霜。",
    "family_zwj": "👨\u200d👩\u200d👧\u200d👦",
    "flags": "🇨🇳🇺🇸",
    "skin_tone": "👍🏽",
    "keycaps": "1️⃣ 2️⃣ #️⃣",
    "rainbow_flag": "🏳️\u200d🌈",
    "mixed": "我爱🍎和🍌！ 𠀀𠀁𪚥 ʘ‿ʘ ᚠᚢᚦ 𝔘𝔫𝔦 ｱｲｳ",
    "leading_space": "  leading spaces and\n\ttabs ",
}


@pytest.mark.parametrize("name", list(STREAM_TEXTS))
def test_stream_text_has_no_broken_characters(tok: ChatGLMTokenizer, name: str) -> None:
    text = STREAM_TEXTS[name]
    deltas, tail = stream_checked(tok, tok.encode(text))
    assert "".join(deltas) + tail == text
    assert tail == ""
    assert not any(FFFD in d for d in deltas)


def test_byte_pieces_held_until_character_complete(tok: ChatGLMTokenizer) -> None:
    deltas, tail = stream_checked(tok, [243, 162, 148, 142, 31404])
    assert deltas == ["", "", "", "👋", "！"] and tail == ""


def test_invalid_bytes_at_end_come_out_on_flush(tok: ChatGLMTokenizer) -> None:
    deltas, tail = stream_checked(tok, [36474, 54591, 243, 162])
    assert deltas == ["你", "好", "", ""]
    assert tail == FFFD * 2


def test_invalid_bytes_in_middle(tok: ChatGLMTokenizer) -> None:
    deltas, tail = stream_checked(tok, [243, 162, 36474])
    assert deltas == ["", "", FFFD * 2 + " 你"] and tail == ""


def test_bytes_that_cannot_complete_are_emitted_at_once(tok: ChatGLMTokenizer) -> None:
    assert stream_checked(tok, [3 + 0xFF])[0] == [FFFD]
    assert stream_checked(tok, [3 + 0xED, 3 + 0xA0])[0] == ["", FFFD * 2]  # surrogate prefix
    assert stream_checked(tok, [3 + 0xC0, 3 + 0xAF])[0] == [FFFD, FFFD]  # overlong lead


def test_first_piece_leading_space(tok: ChatGLMTokenizer) -> None:
    assert stream_checked(tok, [30910, 36474])[0] == ["", " 你"]
    assert stream_checked(tok, [2, 36474, 30910])[0] == ["", "你", " "]
    assert stream_checked(tok, [13, 30910])[0] == ["\n", " "]


def test_special_tokens_in_stream(tok: ChatGLMTokenizer) -> None:
    ids = [36474, 243, 162, 64795, 148, 142, 36474]
    deltas, _ = stream_checked(tok, ids, skip=False)
    assert deltas == ["你", "", "", FFFD * 2 + "<|user|>", FFFD, FFFD, " 你"]
    deltas, _ = stream_checked(tok, ids, skip=True)
    assert deltas == ["你", "", "", FFFD * 2, FFFD, FFFD, " 你"]
    assert stream_checked(tok, [36474, 64796, 36474], skip=False)[0] == ["你", "<|assistant|>", "你"]


def test_padding_ids_are_ignored(tok: ChatGLMTokenizer) -> None:
    deltas, _ = stream_checked(tok, [243, 64800, 162, 148, 142])
    assert deltas == ["", "", "", "", "👋"]


def test_out_of_range_id(tok: ChatGLMTokenizer) -> None:
    with pytest.raises(ValueError, match="token id 65024 is outside"):
        tok.stream_decoder().push(65024)


def test_flush_starts_a_new_stream(tok: ChatGLMTokenizer) -> None:
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in (36474, 243)] == ["你", ""]
    assert dec.flush() == FFFD
    assert dec.push(36474) == "你"


def test_window_stays_bounded(tok: ChatGLMTokenizer) -> None:
    rng = random.Random(3)
    dec = tok.stream_decoder()
    ids = [rng.choice([243, 162, 148, 142, 258, 36474, 30910]) for _ in range(20000)]
    out = []
    for i in ids:
        out.append(dec.push(i))
        assert len(dec.held_ids) <= 3
    assert "".join(out) + dec.flush() == tok.decode(ids)


def _id_pool() -> list[int]:
    pool = set(range(0, 259)) | set(SPECIAL_IDS) | {30910, 265, 64798, 65023}
    cases = FIXTURES / "tokenizer" / "cases.json"
    if cases.is_file():
        for case in load_json(cases)["encode_cases"]:
            pool.update(case["ids"])
    return sorted(pool)


def test_random_sequences_match_decode(tok: ChatGLMTokenizer) -> None:
    rng = random.Random(12345)
    pool = _id_pool()
    byte_ids = list(range(3, 259))
    for _ in range(400):
        n = rng.randint(1, 40)
        ids = [rng.choice(byte_ids if rng.random() < 0.5 else pool) for _ in range(n)]
        stream_checked(tok, ids, skip=rng.random() < 0.5)


def test_utf8_status_agrees_with_the_utf8_table() -> None:
    proper_prefixes = set()
    for cp in range(0x80, 0x110000, 64):  # the last byte (cp & 63) is never part of a proper prefix
        if not 0xD800 <= cp < 0xE000:
            encoded = chr(cp).encode("utf-8")
            proper_prefixes.update(encoded[:k] for k in range(1, len(encoded)))
    inputs = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    inputs += [bytes([a, b, c]) for a in (0xF0, 0xF4, 0xF5) for b in range(0x80, 0xC0) for c in range(256)]
    for data in inputs:
        complete = [k for k in range(1, len(data) + 1) if _one_char(data[:k])]
        expected = complete[0] if complete else INCOMPLETE if data in proper_prefixes else INVALID
        assert utf8_char_status(data, 0) == expected, data


def _one_char(data: bytes) -> bool:
    try:
        return len(data.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def test_tiny_model_stream_invariant(tiny_tok: ChatGLMTokenizer) -> None:
    assert tiny_tok.num_pieces == 320
    for text in ["hello world 你好", "👨\u200d👩\u200d👧\u200d👦 and 🇨🇳 flags", "新的字 ünïcödé 𠀀", "  x\n"]:
        ids = tiny_tok.encode(text)
        deltas, tail = stream_checked(tiny_tok, ids)
        assert "".join(deltas) + tail == tiny_tok.decode(ids)
        assert not any(FFFD in d for d in deltas) and tail == ""
    rng = random.Random(99)
    pool = list(range(tiny_tok.num_pieces)) + SPECIAL_IDS
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        stream_checked(tiny_tok, ids, skip=rng.random() < 0.5)


def test_tiny_model_rejects_ids_it_does_not_have(tiny_tok: ChatGLMTokenizer) -> None:
    with pytest.raises(ValueError, match="token id 5000 is not in .*tiny.model, which has 320 pieces"):
        tiny_tok.decode([5000])


def run_matcher(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    matcher = StopSequenceMatcher(stops)
    out = ""
    for chunk in chunks:
        text, hit = matcher.push(chunk)
        out += text
        if hit:
            return out, True
    return out + matcher.flush(), False


def test_stop_sequence_split_across_chunks() -> None:
    matcher = StopSequenceMatcher(["</answer>"])
    assert matcher.push("The result is 4.</ans") == ("The result is 4.", False)
    assert matcher.push("wer> trailing") == ("", True)
    assert matcher.push("more") == ("", True)


def test_partial_prefix_is_released() -> None:
    matcher = StopSequenceMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.push("O") == ("", False)
    assert matcher.push("P!") == ("", True)
    matcher = StopSequenceMatcher(["STOP"])
    assert matcher.push("go STO") == ("go ", False)
    assert matcher.push("ck") == ("STOck", False)
    assert matcher.push("S") == ("", False)
    assert matcher.flush() == "S"


def test_cjk_stop_sequence() -> None:
    assert run_matcher(["观察结果："], ["好的，", "我来查一下。观", "察", "结果：晴"]) == ("好的，我来查一下。", True)
    assert run_matcher(["观察结果："], ["观察", "者"]) == ("观察者", False)


def test_empty_stop_strings_are_ignored() -> None:
    assert run_matcher(["", "x"], ["abc", "dxe"]) == ("abcd", True)
    assert run_matcher([""], ["abc"]) == ("abc", False)


def test_stop_result_does_not_depend_on_chunking() -> None:
    rng = random.Random(5)
    stops = ["abc", "b", "ca", "ccc"]
    for _ in range(300):
        text = "".join(rng.choice("abcx") for _ in range(rng.randint(0, 12)))
        expected = run_matcher(stops, [text])
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run_matcher(stops, chunks) == expected, (text, chunks)
        assert run_matcher(stops, list(text)) == expected


def _first_stop(stops: list[str], text: str) -> tuple[str, bool]:
    """The rule stated plainly: the match that ends first wins, the earlier-starting on a tie."""
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    if not found:
        return text, False
    return text[:min(found)[1]], True


def test_automaton_agrees_with_the_plain_rule_on_overlapping_stops() -> None:
    """Stops that are suffixes, prefixes and overlaps of each other (the failure links' hard cases)."""
    rng = random.Random(11)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        assert run_matcher(stops, [text]) == _first_stop(stops, text), (stops, text)
        assert run_matcher(stops, list(text)) == _first_stop(stops, text), (stops, text)


def test_held_text_is_the_longest_possible_stop_start() -> None:
    matcher = StopSequenceMatcher(["abcd", "bcx"])
    assert matcher.push("zabc") == ("z", False)  # "abc" may still become "abcd"
    assert matcher.push("x") == ("a", True)  # "bcx" ends first


def test_stop_sequence_bounds_are_errors() -> None:
    from chatglm.text.stops import MAX_STOP_CHARS, MAX_STOP_SEQUENCES

    StopSequenceMatcher(["x" * MAX_STOP_CHARS] * MAX_STOP_SEQUENCES)
    with pytest.raises(ValueError, match=f"{MAX_STOP_SEQUENCES + 1} stop sequences given; at most "
                                         f"{MAX_STOP_SEQUENCES}"):
        StopSequenceMatcher([str(i) for i in range(MAX_STOP_SEQUENCES + 1)])
    with pytest.raises(ValueError, match=f"stop sequence 1 is {MAX_STOP_CHARS + 1} characters long"):
        StopSequenceMatcher(["a", "b" * (MAX_STOP_CHARS + 1)])


def _push_seconds(stops: list[str], pieces: list[str]) -> float:
    import time

    best = float("inf")
    for _ in range(3):
        matcher = StopSequenceMatcher(stops)
        started = time.perf_counter()
        for piece in pieces:
            matcher.push(piece)
        best = min(best, time.perf_counter() - started)
    return best


def test_push_cost_does_not_grow_with_the_stop_sequences() -> None:
    """The largest allowed set of worst-case stops (long runs of the streamed character, each ending
    differently, so every position is a possible start) costs about what one short stop does per
    pushed token. (The matcher that checked every stop on every push took 15x as long here as with
    one stop: 241 vs 15.5 ms for these 20000 pushes.)"""
    from chatglm.text.stops import MAX_STOP_CHARS, MAX_STOP_SEQUENCES

    pieces = ["aa"] * 20000
    worst = ["a" * (MAX_STOP_CHARS - 1) + chr(0x4E00 + i) for i in range(MAX_STOP_SEQUENCES)]
    small, large = _push_seconds(["zz"], pieces), _push_seconds(worst, pieces)
    print(f"\n20000 pushes: {small * 1e3:.1f} ms with one 2-char stop, {large * 1e3:.1f} ms with "
          f"{MAX_STOP_SEQUENCES} stops of {MAX_STOP_CHARS} chars ({large / small:.1f}x)")
    assert large < 4 * small + 0.01
