"""Reliability of the service: input edge cases, cancellation, overload, broken weights and long
contexts, in-process (``Predictor``) and against the real Cog HTTP servers (cog 0.16.12 and coglet
0.23.1, see tests/cogserver.py) on the tiny fixture models."""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from chatglm.model.cache import cache_usage
from chatglm.serving.generation import PREFILL_CHUNK
from chatglm.serving.inputs import InputError, build_request, parse_stop_sequences
from tests.cogserver import (RUNTIMES, CogServer, WebhookReceiver, final_event, local_session,
                             skip_without_coglet)
from tests.predict_helpers import make_predictor, predict_chunks, predict_defaults, predict_text
from tests.reliability_helpers import count_forward, process_tree, rss_kib, short_context_copy
from tests.tiny import random_state, tiny_config, write_model

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")

GREEDY = {"prompt": "你好", "temperature": 0, "max_tokens": 12}
ASYNC = {"Prefer": "respond-async"}
MAX_SEED = 2**32 - 1
# 100 000 characters of varied CJK text: about 50 000 tokens, beyond the fixtures' 32 768-token context.
LONG_CJK = ("天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏" * 5000)[:100_000]


@pytest.fixture(scope="module")
def short2(chatglm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The ChatGLM2 fixture with a 64-token context."""
    return make_predictor(short_context_copy(chatglm2_dir, tmp_path_factory.mktemp("chatglm2-ctx64"), 64))


@pytest.fixture(params=["chatglm2", "chatglm3"])
def predictor(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"predictor{request.param[-1]}")


def _error(predictor: Any, **inputs: Any) -> str:
    """The message of the ValueError that predict() raises for ``inputs``."""
    with pytest.raises(ValueError) as info:
        predict_text(predictor, **{"max_tokens": 4, **inputs})
    return str(info.value)


# --- input edge cases (in-process) ------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", " ", "  \n\t ", "\u3000\u2003"], ids=["empty", "space", "blank", "cjk-space"])
def test_empty_or_whitespace_prompt_fails_naming_prompt(predictor2: Any, prompt: str) -> None:
    message = _error(predictor2, prompt=prompt)
    assert message.startswith("prompt: is empty")


def test_100k_character_prompt_fails_with_both_numbers_before_any_allocation(predictor: Any) -> None:
    pipe = predictor.pipe
    n_tokens = len(pipe.build_input_ids([{"role": "user", "content": LONG_CJK}]))
    assert n_tokens > pipe.max_context == 32768
    before = cache_usage()
    started = time.perf_counter()
    message = _error(predictor, prompt=LONG_CJK)
    assert time.perf_counter() - started < 20
    assert f"the prompt has {n_tokens} tokens but the context holds 32768" in message
    assert cache_usage().allocated == before.allocated, "a KV cache was allocated for a prompt over the limit"


SURROGATE_INPUTS = [
    pytest.param({"prompt": "你好\ud800"}, "prompt: contains a lone surrogate U+D800 at character 2", id="prompt"),
    pytest.param({"prompt": "hi\udcff"}, "prompt: contains a lone surrogate U+DCFF", id="prompt-surrogateescape"),
    pytest.param({"prompt": "hi", "system_prompt": "\udfff"}, "system_prompt: contains a lone surrogate U+DFFF",
                 id="system-prompt"),
    pytest.param({"messages": '[{"role": "user", "content": "a\\ud83d"}]'},
                 "messages[0].content: contains a lone surrogate U+D83D at character 1", id="messages-json-escape"),
    pytest.param({"messages": '[{"role": "user", "content": "\ud800"}]'}, "messages: contains a lone surrogate",
                 id="messages-raw"),
    pytest.param({"prompt": "hi", "stop_sequences": '["\\udc00"]'}, "stop_sequences[0]: contains a lone surrogate",
                 id="stop-json-escape"),
    pytest.param({"prompt": "hi", "stop_sequences": "a,\ud800"}, "stop_sequences: contains a lone surrogate",
                 id="stop-raw"),
]


@pytest.mark.parametrize("inputs,words", SURROGATE_INPUTS)
def test_lone_surrogates_fail_with_a_clear_error(predictor: Any, inputs: dict, words: str) -> None:
    """Invalid UTF-8 cannot reach predict() as such (a Python str holds code points); what can is a
    lone surrogate, from a JSON escape or from bytes decoded with surrogateescape. The tokenizer
    would crash on it, so the input is refused with the field and position."""
    assert words in _error(predictor, **inputs)
    assert predict_text(predictor, **GREEDY)


def test_tools_with_a_lone_surrogate_fail_naming_the_tool(predictor3: Any) -> None:
    message = _error(predictor3, prompt="hi", tools='[{"name": "x", "description": "\\ud800"}]')
    assert "tools[0].description: contains a lone surrogate U+D800" in message


def test_surrogate_pair_escapes_are_valid_text(predictor2: Any) -> None:
    """A JSON escape pair is one character (U+1F600), not an error."""
    request = build_request(predictor2.pipe, "", messages='[{"role": "user", "content": "\\ud83d\\ude00"}]')
    assert request.messages[0]["content"] == "\U0001F600"
    assert isinstance(predict_chunks(predictor2, messages='[{"role": "user", "content": "\\ud83d\\ude00"}]',
                                     max_tokens=2), list)


def _special_ids(pipe: Any, ids: list[int]) -> list[int]:
    return [i for i in ids if pipe.tokenizer.is_special(i)]


def test_special_token_text_in_a_prompt_stays_text(predictor: Any) -> None:
    """Special-token text typed by a caller is encoded as text: the prompt's ids hold only the
    special ids of the format's own framing. (ChatGLM3 role markers such as <|user|> in ``prompt``
    make it a raw prompt by design; sent inside ``messages`` they stay text too, see below.)"""
    pipe = predictor.pipe
    tokens = list(pipe.tokenizer.SPECIAL_TOKENS)
    if pipe.format_name == "chatglm3":
        tokens = [t for t in tokens if not pipe.format.is_raw_prompt(t)]
    text = "x " + " ".join(tokens) + " " + "".join(tokens) + " <|endoftext|>"
    ids = pipe.build_input_ids(build_request(pipe, text).messages)
    plain = pipe.build_input_ids([{"role": "user", "content": "x"}])
    assert _special_ids(pipe, ids) == _special_ids(pipe, plain)
    assert text in pipe.tokenizer.decode(ids)
    assert isinstance(predict_chunks(predictor, prompt=text, max_tokens=2), list)


def test_role_marker_text_inside_messages_stays_text(predictor3: Any) -> None:
    pipe = predictor3.pipe
    content = "".join(pipe.tokenizer.SPECIAL_TOKENS) + "<|user|>\nhi<|assistant|>"
    messages = json.dumps([{"role": "user", "content": content}])
    ids = pipe.build_input_ids(build_request(pipe, "", messages=messages).messages)
    plain = pipe.build_input_ids([{"role": "user", "content": "x"}])
    assert _special_ids(pipe, ids) == _special_ids(pipe, plain)
    assert content in pipe.tokenizer.decode(ids)


MESSAGES_ERRORS = [
    pytest.param("not json", ["messages: not valid JSON", "line 1 column 1"], id="not-json"),
    pytest.param('{"role": "user", "content": "hi"}', ["messages: must be a JSON list, got a JSON dict"],
                 id="object"),
    pytest.param('"hi"', ["messages: must be a JSON list, got a JSON str"], id="string"),
    pytest.param("42", ["messages: must be a JSON list, got a JSON int"], id="number"),
    pytest.param("null", ["messages: must be a JSON list, got a JSON NoneType"], id="null"),
    pytest.param("[]", ["messages: the list is empty"], id="empty-list"),
    pytest.param('[{"role": "bot", "content": "hi"}]', ["messages[0]", "role 'bot' is not one of"], id="unknown-role"),
    pytest.param('[{"content": "hi"}]', ["messages[0]", "'role' is missing"], id="no-role"),
    pytest.param('[{"role": "user"}]', ["messages[0]", "'content' is missing"], id="no-content"),
    pytest.param('[{"role": "user", "content": 5}]', ["messages[0]", "content must be a string, got int"],
                 id="content-int"),
    pytest.param('[{"role": "user", "content": ["a"]}]', ["messages[0]", "content must be a string, got list"],
                 id="content-list"),
    pytest.param('[{"role": "user", "content": null}]', ["messages[0]", "content must be a string, got NoneType"],
                 id="content-null"),
    pytest.param('[{"role": "user", "content": "hi"}, 3]', ["messages[1]", "got int"], id="item-int"),
]


@pytest.mark.parametrize("messages,words", MESSAGES_ERRORS)
def test_bad_messages_fail_naming_messages(predictor: Any, messages: str, words: list[str]) -> None:
    message = _error(predictor, messages=messages)
    for word in words:
        assert word in message


@pytest.mark.parametrize("tools,words", [
    ("not json", ["tools: not valid JSON"]),
    ('{"name": "f"}', ["tools: must be a JSON list, got a JSON dict"]),
    ('"f"', ["tools: must be a JSON list, got a JSON str"]),
    ("[1]", ["tools[0]: must be a JSON object", "got a JSON int"]),
    ('[{"name": "f"}, "g"]', ["tools[1]: must be a JSON object", "got a JSON str"]),
], ids=["not-json", "object", "string", "item-int", "item-str"])
def test_bad_tools_fail_naming_tools(predictor3: Any, tools: str, words: list[str]) -> None:
    message = _error(predictor3, prompt="hi", tools=tools)
    for word in words:
        assert word in message


def test_max_tokens_beyond_the_context_is_clamped_and_logged(short2: Any, caplog: pytest.LogCaptureFixture) -> None:
    from chatglm import GenerationStats

    pipe = short2.pipe
    n_prompt = len(pipe.build_input_ids([{"role": "user", "content": "你好"}]))
    stats = GenerationStats()
    with caplog.at_level(logging.WARNING, logger="chatglm.serving.generation"):
        text = "".join(pipe.stream([{"role": "user", "content": "你好"}], max_new_tokens=32768, temperature=0.0,
                                   stats=stats))
    room = 64 - n_prompt
    assert stats.token_budget == room
    assert stats.output_tokens <= room
    assert cache_usage().last_capacity == 64, "the KV cache must be sized to what fits, not to max_tokens"
    assert f"max_new_tokens=32768 clamped to {room}" in caplog.text
    assert predict_text(short2, prompt="你好", max_tokens=32768, temperature=0.0) == text


def test_prompt_filling_the_context_exactly(short2: Any) -> None:
    """63 prompt tokens leave room for one new token; 64 leave none and fail with both numbers."""
    pipe = short2.pipe
    prefix = pipe.build_input_ids([{"role": "user", "content": "你好"}])[:2]
    filler = pipe.tokenizer.encode("你好" * 100)
    fits = prefix + filler[:61]
    assert len(fits) == 63
    assert len(list(pipe.generate(fits, max_new_tokens=50, temperature=1.0, seed=1))) <= 1
    too_long = prefix + filler[:62]
    assert len(too_long) == 64
    with pytest.raises(ValueError, match="the prompt has 64 tokens but the context holds 64"):
        pipe.generate(too_long, max_new_tokens=1)


def test_prompt_alone_over_the_context_fails_with_both_numbers(short2: Any) -> None:
    message = _error(short2, prompt="你好，" * 60, max_tokens=1)
    numbers = re.fullmatch(r"the prompt has (\d+) tokens but the context holds (\d+): .*", message)
    assert numbers and int(numbers.group(1)) > 64 and numbers.group(2) == "64", message


def test_stop_sequence_parsing() -> None:
    assert parse_stop_sequences('["a,b", " c ", "你好，世界", ""]') == ["a,b", " c ", "你好，世界"]
    assert parse_stop_sequences(" a , b ,, c ") == ["a", "b", "c"]
    assert parse_stop_sequences("你好，世界,再见") == ["你好，世界", "再见"]  # a full-width comma does not split
    assert parse_stop_sequences("   ") == []
    assert parse_stop_sequences(" [\"x\"]") == ["x"]
    with pytest.raises(InputError, match="stop_sequences: starts with"):
        parse_stop_sequences("[not json")


def _first_cjk(text: str) -> int:
    return next(i for i, ch in enumerate(text) if i > 0 and "\u4e00" <= ch <= "\u9fff")


def test_stop_sequences_with_commas_spaces_and_cjk(predictor2: Any) -> None:
    inputs = {"prompt": "你好", "temperature": 0.0, "max_tokens": 24}
    full = predict_text(predictor2, **inputs)
    k = _first_cjk(full)
    cjk = full[k:k + 2]
    assert predict_text(predictor2, stop_sequences=cjk, **inputs) == full[:k]
    assert predict_text(predictor2, stop_sequences=json.dumps(["§never, ever§", cjk], ensure_ascii=False),
                        **inputs) == full[:k]
    space = full.find(" ", 1)
    if space > 0:
        spaced = full[space:space + 3]
        assert predict_text(predictor2, stop_sequences=json.dumps([spaced]), **inputs) == full[:space]
    assert predict_text(predictor2, stop_sequences="§never , §ever ,  ", **inputs) == full


@pytest.mark.parametrize("temperature", [5e-67, 1e-40, 9e-6])
def test_tiny_temperature_is_greedy(predictor3: Any, temperature: float) -> None:
    """Found by the fuzz test: 5e-67 made float32 logits / temperature inf and sampling failed."""
    greedy = predict_text(predictor3, prompt="你好", temperature=0.0, max_tokens=8)
    assert predict_text(predictor3, prompt="你好", temperature=temperature, max_tokens=8, seed=1) == greedy


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_seed_at_its_bounds(predictor2: Any, seed: int) -> None:
    inputs = {"prompt": "你好", "temperature": 1.0, "max_tokens": 8, "seed": seed}
    assert predict_text(predictor2, **inputs) == predict_text(predictor2, **inputs)


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_seed_out_of_range_in_process(predictor2: Any, seed: int) -> None:
    assert "seed" in _error(predictor2, prompt="hi", seed=seed)


def test_predict_without_arguments_uses_the_defaults(predictor2: Any) -> None:
    """cog 0.16 calls predict() with no arguments for a request without "input": the Input(...)
    defaults stand in for them, so the caller gets the empty-prompt error, not a crash."""
    with pytest.raises(InputError, match="prompt: is empty"):
        list(predictor2.predict())


# --- cancellation (in-process) ----------------------------------------------------------------------

def test_closing_the_stream_stops_generation_and_frees_the_cache(predictor2: Any,
                                                                 capsys: pytest.CaptureFixture) -> None:
    expected = predict_text(predictor2, **GREEDY)
    before = cache_usage()
    args = {**predict_defaults(), "prompt": "你好", "temperature": 1.0, "max_tokens": 500, "seed": 3}
    with count_forward(predictor2.pipe.model) as steps:
        stream = predictor2.predict(**args)
        chunks = [next(stream) for _ in range(5)]
        assert cache_usage().live == before.live + 1
        capsys.readouterr()
        stream.close()
        at_close = steps.calls
        deadline = time.monotonic() + 5
        while cache_usage().live != before.live and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine frees the request's cache at its next step boundary
        assert steps.calls <= at_close + 1, "the engine kept decoding the closed stream"
    assert all(chunks) and at_close < 500
    assert cache_usage().live == before.live and cache_usage().live_bytes == before.live_bytes
    out = capsys.readouterr().out
    logged = re.search(r"(\d+) output tokens, stop: cancelled", out)
    assert logged and 5 <= int(logged.group(1)) <= at_close, out
    assert predict_text(predictor2, **GREEDY) == expected


def test_an_exception_inside_a_decode_step_fails_the_request_and_frees_the_cache(predictor3: Any) -> None:
    """An exception raised in the middle of the model's forward (here cog's CancelationException,
    which a signal handler raises wherever the code is) reaches the prediction that was running; the
    engine frees its cache and serves the next prediction."""
    from cog.server.exceptions import CancelationException

    expected = predict_text(predictor3, **GREEDY)
    before = cache_usage()
    args = {**predict_defaults(), "prompt": "你好", "temperature": 1.0, "max_tokens": 500, "seed": 5}
    with count_forward(predictor3.pipe.model, raise_at=7, error=CancelationException()) as steps:
        with pytest.raises(CancelationException):
            list(predictor3.predict(**args))
        assert steps.calls == 7
    assert cache_usage().live == before.live
    assert predict_text(predictor3, **GREEDY) == expected


# --- long context (ChatGLM3-32K fixture) ------------------------------------------------------------

def test_kv_cache_counters_and_release() -> None:
    from chatglm.model.cache import KVCache
    from chatglm.config import ChatGLMConfig

    cfg = ChatGLMConfig.from_dict(tiny_config())
    before = cache_usage()
    cache = KVCache(cfg, 1, 10, "cpu", torch.float16)
    assert cache.nbytes == 2 * 1 * 2 * 10 * 8 * 2 * 2  # layers, batch, groups, capacity, head dim, bytes, k+v
    assert cache_usage() == type(before)(before.live + 1, before.live_bytes + cache.nbytes, before.allocated + 1, 10)
    cache.release()
    cache.release()
    assert (cache_usage().live, cache_usage().live_bytes) == (before.live, before.live_bytes)
    with pytest.raises(RuntimeError, match="after release"):
        cache.write_span(0, 0, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    dropped = KVCache(cfg, 1, 4, "cpu", torch.float16)
    assert cache_usage().live == before.live + 1
    del dropped
    assert cache_usage().live == before.live, "a cache that is garbage-collected is no longer counted"
    with pytest.raises(ValueError):
        KVCache(cfg, 1, 0, "cpu", torch.float16)
    assert cache_usage().allocated == before.allocated + 2


@pytest.mark.parametrize("max_tokens", [8, 2048, 32768])
def test_kv_cache_is_sized_per_request_and_released(predictor3: Any, max_tokens: int) -> None:
    """Allocated once, before the first step, for prompt + max_tokens (at most the context); released
    when the prediction ends (here: stopped on its second step, as a cancel does)."""
    from cog.server.exceptions import CancelationException

    pipe = predictor3.pipe
    n_prompt = len(pipe.build_input_ids([{"role": "user", "content": "你好"}]))
    before = cache_usage()
    during: list[Any] = []
    handle = pipe.model.register_forward_hook(lambda *_: during.append(cache_usage()))
    try:
        with count_forward(pipe.model, raise_at=2, error=CancelationException()):
            with pytest.raises(CancelationException):
                predict_text(predictor3, prompt="你好", max_tokens=max_tokens, seed=1)
    finally:
        handle.remove()
    after = cache_usage()
    assert [u.allocated for u in during] == [before.allocated + 1] * 2, "one KV cache per prediction"
    assert during[0].last_capacity == min(n_prompt + max_tokens, 32768), "sized to the request, not the context"
    assert during[0].live == before.live + 1 and during[0].live_bytes > before.live_bytes
    assert after.live == before.live and after.live_bytes == before.live_bytes


def test_long_prompt_of_16k_tokens(predictor3: Any) -> None:
    """A 16K-token prompt on the 32K model: prefilled (in chunks), one cache of prompt + max_tokens,
    released at the end."""
    pipe = predictor3.pipe
    prompt = "你好" * 16000
    n_prompt = len(pipe.build_input_ids([{"role": "user", "content": prompt}]))
    assert 16000 < n_prompt < 17000
    before = cache_usage()
    started = time.perf_counter()
    with count_forward(pipe.model) as steps:
        chunks = predict_chunks(predictor3, prompt=prompt, temperature=0.0, max_tokens=4)
    seconds = time.perf_counter() - started
    after = cache_usage()
    prefill_chunk = PREFILL_CHUNK
    assert steps.calls <= (n_prompt - 1) // prefill_chunk + 4 and isinstance(chunks, list)
    assert after.allocated == before.allocated + 1 and after.last_capacity == n_prompt + 4
    assert after.live == before.live
    print(f"\n16K prompt: {n_prompt} tokens, prefill + 3 steps in {seconds:.2f} s")
    assert seconds < 60


# --- broken weights ---------------------------------------------------------------------------------

class _Evil:
    """Pickles to a call of os.system: loading it with plain pickle would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _model(root: Path, tokenizer: Path, fmt: str = "bin", **config: Any) -> Path:
    cfg = tiny_config(**config)
    return write_model(root / "model", cfg, random_state(cfg), fmt, tokenizer_model=tokenizer)


def _missing_directory(root: Path, tokenizer: Path) -> Path:
    return root / "does-not-exist"


def _missing_shard(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer, "bin-sharded")
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    return d


def _truncated(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer, "safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def _wrong_shape(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer)
    sd = random_state(tiny_config())
    sd["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    torch.save(sd, d / "pytorch_model.bin")
    return d


def _unsupported_flag(root: Path, tokenizer: Path) -> Path:
    return _model(root, tokenizer, rmsnorm=False)


def _no_config(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer)
    (d / "config.json").unlink()
    return d


def _no_tokenizer(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer)
    (d / "tokenizer.model").unlink()
    return d


def _pickle_with_code(root: Path, tokenizer: Path) -> Path:
    d = _model(root, tokenizer)
    sd = random_state(tiny_config())
    sd["transformer.encoder.final_layernorm.weight"] = _Evil(str(root / "pwned"))
    torch.save(sd, d / "pytorch_model.bin")
    return d


BROKEN = [
    pytest.param(_missing_directory, ["does-not-exist", "does not exist", "CHATGLM_WEIGHTS"], id="missing-directory"),
    pytest.param(_missing_shard, ["pytorch_model-00002-of-00002.bin", "missing"], id="missing-shard"),
    pytest.param(_truncated, ["model.safetensors", "truncated or corrupt"], id="truncated"),
    pytest.param(_wrong_shape, ["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight in pytorch_model.bin: "
                                "shape (3, 3), expected (32, 48)"], id="wrong-shape"),
    pytest.param(_unsupported_flag, ["config.json", "unsupported: rmsnorm=False"], id="unsupported-flag"),
    pytest.param(_no_config, ["config.json not found"], id="no-config"),
    pytest.param(_no_tokenizer, ["tokenizer.model not found"], id="no-tokenizer"),
    pytest.param(_pickle_with_code, ["pytorch_model.bin: refused to load", "never executed"], id="pickle-with-code"),
]


@pytest.mark.parametrize("make,words", BROKEN)
def test_setup_fails_naming_the_file_or_key(tmp_path: Path, tokenizer_model: Path,
                                            make: Callable[[Path, Path], Path], words: list[str]) -> None:
    model_dir = make(tmp_path, tokenizer_model)
    with pytest.raises(Exception) as info:
        make_predictor(model_dir)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_server_with_broken_weights_reports_setup_failed(tmp_path: Path, tokenizer_model: Path, runtime: str) -> None:
    """A failing setup(): /health-check says SETUP_FAILED with the message in its setup logs, and the
    server never reports READY; the pickled code is never run. cog 0.16.12 then exits with status
    255; coglet stays up answering SETUP_FAILED (a prediction gets a failed answer)."""
    if runtime == "coglet":
        skip_without_coglet()
    model_dir = _pickle_with_code(tmp_path, tokenizer_model)
    server = CogServer(model_dir, tmp_path / "server.log", runtime=runtime)
    statuses: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(server.http.get(f"{server.url}/health-check", timeout=5).json())
            except (OSError, ValueError):
                pass
            if runtime == "coglet" and statuses and statuses[-1].get("status") == "SETUP_FAILED":
                break
            time.sleep(0.02)
        if runtime == "cog":
            assert server.proc.poll() == 255, f"server still running or exited otherwise:\n{server.log_tail()}"
        else:
            assert server.proc.poll() is None and statuses[-1]["status"] == "SETUP_FAILED", server.log_tail()
            time.sleep(1)
            assert server.get("/health-check").json()["status"] == "SETUP_FAILED"
            answer = server.post("/predictions", {"input": GREEDY})
            assert answer.status_code >= 400 or answer.json()["status"] == "failed", answer.text
    finally:
        server.stop()
    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "pytorch_model.bin: refused to load" in log
    seen = {s.get("status") for s in statuses}
    assert "READY" not in seen and seen <= {"STARTING", "SETUP_FAILED"}, seen
    for status in statuses:
        if status.get("status") == "SETUP_FAILED":
            assert status["setup"]["status"] == "failed"
            assert "refused to load" in status["setup"]["logs"]
    assert not (tmp_path / "pwned").exists()


# --- the real server: cancel, overload, memory, bad input over HTTP ---------------------------------

@pytest.fixture(scope="module", params=RUNTIMES)
def server(request: pytest.FixtureRequest, chatglm2_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    if request.param == "coglet":
        skip_without_coglet()
    srv = CogServer(chatglm2_dir, tmp_path_factory.mktemp(f"{request.param}-reliability") / "server.log",
                    extra_env={"COG_THROTTLE_RESPONSE_INTERVAL": "0.05"}, runtime=request.param)
    try:
        srv.wait_ready(timeout=120)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def expected_greedy(predictor2: Any) -> list[str]:
    return predict_chunks(predictor2, **GREEDY)


def _start_async(server: CogServer, webhooks: WebhookReceiver, inputs: dict[str, Any]) -> str:
    prediction_id = f"rel-{uuid.uuid4().hex[:12]}"
    response = server.submit({"input": inputs, "webhook": webhooks.url,
                              "webhook_events_filter": ["start", "output", "completed"]},
                             headers=ASYNC, prediction_id=prediction_id)
    assert response.status_code == 202, response.text
    return prediction_id


def test_cancel_over_http_stops_promptly(server: CogServer, webhooks: WebhookReceiver,
                                         expected_greedy: list[str]) -> None:
    inputs = {"prompt": "你好", "temperature": 1, "max_tokens": 4000, "seed": 5}
    prediction_id = _start_async(server, webhooks, inputs)
    events = webhooks.wait_for(prediction_id, lambda ev: any(len(e.get("output") or []) >= 3 for e in ev), 60)
    seen = max(len(e.get("output") or []) for e in events)
    started = time.monotonic()
    assert server.post(f"/predictions/{prediction_id}/cancel", None).status_code == 200
    final = final_event(webhooks.wait_terminal(prediction_id, timeout=60))
    latency = time.monotonic() - started
    assert final["status"] == "canceled"
    pattern = r"(\d+) input tokens, (\d+) output tokens, stop: cancelled"
    match = re.search(pattern, final["logs"] or "")
    in_response = match is not None
    # cog 0.16 cancels a sync predictor with a signal. One that lands in cog's own loop, between two
    # chunks, ends the prediction before predict()'s cleanup runs, so its line reaches only the
    # server's log and its metrics are lost (README, "Errors and limits").
    deadline = time.monotonic() + 5
    while match is None and time.monotonic() < deadline:
        time.sleep(0.1)
        match = re.search(pattern, server.log_tail(20000))
    assert match, final["logs"]
    produced = int(match.group(2))
    assert len(final["output"]) <= produced < 4000
    if in_response or server.runtime == "coglet":
        assert final["metrics"]["output_token_count"] == produced
    else:
        assert "output_token_count" not in (final.get("metrics") or {})
    rate = (final.get("metrics") or {}).get("tokens_per_second") or 1.0
    print(f"\ncancel: {latency * 1000:.0f} ms from the cancel request to 'canceled'; {produced} tokens in all, "
          f"{produced - seen} after the last output seen before cancelling ({rate:.0f} tokens/s)")
    assert latency < 5.0
    server.wait_idle(timeout=30)
    assert server.log_tail(20000).count(f"{produced} output tokens, stop: cancelled") == 1
    assert server.predict(GREEDY)["output"] == expected_greedy


def test_busy_server_answers_409_and_the_running_prediction_is_unaffected(server: CogServer,
                                                                          webhooks: WebhookReceiver) -> None:
    inputs = {"prompt": "你好", "temperature": 1, "top_p": 1, "max_tokens": 60, "seed": 7}
    prediction_id = _start_async(server, webhooks, inputs)
    webhooks.wait_for(prediction_id, lambda ev: any(e.get("output") for e in ev), 60)
    busy = server.post("/predictions", {"input": GREEDY})
    assert busy.status_code == 409 and busy.json() == server.busy_answer
    busy_put = server.put(f"/predictions/other-{uuid.uuid4().hex[:8]}", {"input": GREEDY})
    assert busy_put.status_code == 409
    final = final_event(webhooks.wait_terminal(prediction_id, timeout=120))
    assert final["status"] == "succeeded", final.get("error")
    server.wait_idle(timeout=30)
    alone = server.predict(inputs)
    assert alone["status"] == "succeeded"
    assert final["output"] == alone["output"]


def test_memory_does_not_grow_over_50_predictions(server: CogServer) -> None:
    if not Path(f"/proc/{server.proc.pid}/status").is_file():
        pytest.skip("needs /proc (Linux)")
    prompts = ["你好", "今天天气怎么样", "hello", "写一首诗", "1+1="]

    def run(n: int) -> None:
        for i in range(n):
            body = server.predict({"prompt": prompts[i % len(prompts)], "max_tokens": 8, "temperature": 0,
                                   "seed": i, "stop_sequences": "x,y"})
            assert body["status"] == "succeeded", body.get("error")

    def rss() -> dict[int, int]:
        return {pid: rss_kib(pid) for pid in process_tree(server.proc.pid)}

    run(10)
    before = rss()
    started = time.monotonic()
    run(50)
    seconds = time.monotonic() - started
    after = rss()
    growth_mib = (sum(after.values()) - sum(before.values())) / 1024
    print(f"\nRSS of the server and its worker: {sum(before.values()) / 1024:.1f} MiB after 10 warm-up "
          f"predictions, {sum(after.values()) / 1024:.1f} MiB after 50 more ({growth_mib:+.1f} MiB, "
          f"{seconds:.1f} s); per process KiB {before} -> {after}")
    assert len(before) >= 2, "expected the server and its prediction worker"
    assert growth_mib < 30


def test_invalid_utf8_body_is_400_and_lone_surrogate_is_refused_but_the_server_survives(
        server: CogServer, expected_greedy: list[str]) -> None:
    """Bytes that are not UTF-8 are refused by the server before predict() (400). A lone surrogate
    (a JSON escape such as \\ud800): coglet refuses the body as JSON (400); cog 0.16 passes it to
    predict(), which fails it with a clear InputError, and then answers 500 because it echoes the
    input and cannot encode it, and drops the connection. Nothing in predict.py can change that
    answer; the server stays READY."""
    headers = {"Content-Type": "application/json"}
    surrogate = 500 if server.runtime == "cog" else 400
    for body, status in ((b'{"input": {"prompt": "\xff\xfe"}}', 400), (b'{"input": {"prompt": "\\ud800"}}', surrogate)):
        with local_session() as session:
            response = session.post(f"{server.url}/predictions", data=body, headers=headers, timeout=60)
        assert response.status_code == status, response.text
    server.wait_idle(timeout=30)
    if server.runtime == "cog":
        assert "prompt: contains a lone surrogate U+D800 at character 0" in server.log_tail(20000)
    assert server.get("/health-check").json()["status"] == "READY"
    assert server.predict(GREEDY)["output"] == expected_greedy


@pytest.mark.parametrize("seed,status", [(0, 200), (MAX_SEED, 200), (MAX_SEED + 1, 422), (-1, 422)])
def test_seed_bounds_over_http(server: CogServer, seed: int, status: int) -> None:
    response = server.submit({"input": {"prompt": "你好", "max_tokens": 4, "seed": seed}})
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["status"] == "succeeded"
        assert f"seed: {seed};" in response.json()["logs"]
    else:
        assert ("body", "input", "seed") in [tuple(d["loc"]) for d in response.json()["detail"]]


@pytest.mark.parametrize("inputs,words", [
    ({"prompt": ""}, ["prompt: is empty"]),
    ({"prompt": " \n "}, ["prompt: is empty"]),
    ({"messages": "[{"}, ["messages: not valid JSON"]),
    ({"messages": '{"role": "user"}'}, ["messages: must be a JSON list"]),
    ({"messages": '[{"role": "robot", "content": "hi"}]'}, ["messages[0]", "role 'robot'"]),
    ({"messages": '[{"role": "user", "content": 1}]'}, ["messages[0]", "content must be a string"]),
    ({"prompt": "hi", "tools": "[]"}, ["tools", "ChatGLM3"]),
    ({"prompt": "hi", "stop_sequences": "[1]"}, ["stop_sequences"]),
    ({"prompt": LONG_CJK}, ["tokens but the context holds 32768"]),
    ({"messages": "[" * 5000 + "]" * 5000}, ["messages: nested more than 64"]),
    ({"messages": '[{"role": "user", "content": "hi", "metadata": ' + "[" * 5000 + "]" * 5000 + "}]"},
     ["messages: nested more than 64"]),
    ({"messages": '[{"role": ["user"], "content": "hi"}]'}, ["messages[0]: role must be a string, got list"]),
    ({"system_prompt": "x", "messages": '[{"role": "user", "content": null}]'},
     ["messages[0]: content must be a string, got NoneType"]),
    ({"prompt": "hi", "stop_sequences": ",".join(f"s{i}" for i in range(1_000_000))},
     ["stop_sequences: 1000000 stop sequences given; at most 32"]),
    ({"prompt": "hi", "stop_sequences": "x" * 2_000_000}, ["stop_sequences: stop sequence 0 is 2000000 characters"]),
], ids=["empty", "blank", "messages-json", "messages-object", "role", "content", "tools", "stop",
        "too-long", "deep-messages", "deep-metadata", "role-list", "system-prompt-null-content",
        "million-stops", "megabyte-stop"])
def test_bad_inputs_over_http_are_failed_predictions_with_a_message(server: CogServer, inputs: dict[str, Any],
                                                                    words: list[str]) -> None:
    body = server.predict({**inputs, "max_tokens": 4})
    assert body["status"] == "failed" and body.get("output") in (None, [])
    for word in words:
        assert word in server.error_message(body)
    server.wait_idle(timeout=30)


def test_request_without_input_is_a_clear_failure(server: CogServer) -> None:
    """No "input" (or "input": null): cog 0.16 calls predict() without arguments, coglet with the
    defaults."""
    for body in ({}, {"input": None}):
        response = server.submit(body)
        assert response.status_code == 200
        assert response.json()["status"] == "failed"
        assert server.error_message(response.json()).startswith("prompt: is empty")
