"""The Cog predictor in-process: ``Predictor().setup()`` on the tiny fixture models, then
``predict()`` compared with the Pipeline it wraps (greedy text, seeds, max_tokens, stop sequences,
raw prompts, tool calls) and its input errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.predict_helpers import expected_reply, make_predictor, predict_chunks, predict_defaults, predict_text

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")

HELLO = [{"role": "user", "content": "你好"}]
# The sampling inputs predict() passes on to the Pipeline unchanged, with their service defaults.
DEFAULT_SAMPLING = {k: v for k, v in predict_defaults().items() if k in ("top_p", "top_k", "repetition_penalty")}


@pytest.fixture(params=["chatglm2", "chatglm3"])
def predictor(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("predictor2" if request.param == "chatglm2" else "predictor3")


def test_setup_loads_the_right_family(predictor2: Any, predictor3: Any) -> None:
    assert predictor2.pipe.format_name == "chatglm2"
    assert predictor3.pipe.format_name == "chatglm3"
    assert predictor2.pipe.config.quantization_bit == 4


def test_greedy_output_equals_pipeline(predictor: Any) -> None:
    pipe = predictor.pipe
    out = predict_text(predictor, prompt="你好", temperature=0.0, max_tokens=24)
    ids = list(pipe.generate(pipe.build_input_ids(HELLO), max_new_tokens=24, temperature=0.0))
    assert 0 < len(ids) <= 24
    assert out == expected_reply(pipe.format_name, pipe.tokenizer.decode(ids))
    assert out == pipe.chat(HELLO, max_new_tokens=24, temperature=0.0)
    assert out.strip(), "the tiny model's greedy answer is expected to be non-empty"


def test_greedy_output_ignores_seed_and_sampling_knobs(predictor2: Any) -> None:
    base = predict_text(predictor2, prompt="你好", temperature=0.0, max_tokens=12)
    assert predict_text(predictor2, prompt="你好", temperature=0.0, max_tokens=12, seed=5, top_p=0.3) == base


def test_seed_reproducibility(predictor: Any) -> None:
    kwargs = {"prompt": "你好", "temperature": 1.0, "max_tokens": 16}
    first = predict_text(predictor, seed=1, **kwargs)
    assert predict_text(predictor, seed=1, **kwargs) == first
    assert predict_text(predictor, seed=2, **kwargs) != first
    same = predictor.pipe.chat(HELLO, max_new_tokens=16, temperature=1.0, seed=1, **DEFAULT_SAMPLING)
    assert same == first


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_is_exact(predictor: Any, max_tokens: int) -> None:
    from chatglm import GenerationStats

    pipe = predictor.pipe
    sampling = dict(temperature=1.0, seed=3, **DEFAULT_SAMPLING)
    stats = GenerationStats()
    text = "".join(pipe.stream(HELLO, max_new_tokens=max_tokens, stats=stats, **sampling))
    assert stats.output_tokens == max_tokens
    assert stats.stop_reason == "max_tokens"
    ids = list(pipe.generate(pipe.build_input_ids(HELLO), max_new_tokens=max_tokens, **sampling))
    assert len(ids) == max_tokens
    assert predict_text(predictor, prompt="你好", max_tokens=max_tokens, temperature=1.0, seed=3) == text


def _greedy_reply(predictor: Any, max_tokens: int = 40) -> tuple[str, list[int]]:
    """The greedy answer to 你好 (no stop sequences) and the offsets in it where one generated token
    ends and the next begins (from the tokenizer's stream decoder)."""
    pipe = predictor.pipe
    ids = list(pipe.generate(pipe.build_input_ids(HELLO), max_new_tokens=max_tokens, temperature=0.0))
    decoder = pipe.tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    generated = "".join(pieces)
    reply = expected_reply(pipe.format_name, generated)
    assert predict_text(predictor, prompt="你好", temperature=0.0, max_tokens=max_tokens) == reply
    shift = len(generated) - len(reply)
    assert generated[shift:] == reply, "the tiny model's answer is expected to be plain text"
    cuts, pos = [], 0
    for piece in pieces:
        pos += len(piece)
        if piece and 0 < pos - shift < len(reply):
            cuts.append(pos - shift)
    return reply, cuts


def _stopped(predictor: Any, stop_sequences: str) -> str:
    return predict_text(predictor, prompt="你好", temperature=0.0, max_tokens=40, stop_sequences=stop_sequences)


def test_stop_sequence_inside_the_answer(predictor: Any) -> None:
    full, _ = _greedy_reply(predictor)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(stop) == 2
    out = _stopped(predictor, json.dumps([stop]))
    assert out == full[:full.index(stop)]
    assert stop not in out


def test_stop_sequence_across_a_token_boundary(predictor: Any) -> None:
    full, cuts = _greedy_reply(predictor)
    candidates = [cut for cut in cuts if full.find(full[cut - 1:cut + 1]) == cut - 1]
    assert candidates, f"no usable token boundary in {full!r} (cuts {cuts})"
    cut = candidates[len(candidates) // 2]
    stop = full[cut - 1:cut + 1]
    out = _stopped(predictor, json.dumps([stop]))
    assert out == full[:cut - 1]
    assert stop not in out


def test_stop_sequences_comma_separated_earliest_wins(predictor: Any) -> None:
    full, _ = _greedy_reply(predictor)
    letters = [c for c in dict.fromkeys(full[1:]) if c.strip() and c not in ",[]\"\\"]
    assert len(letters) >= 2, f"too few distinct characters in {full!r}"
    first, second = letters[0], letters[1]
    cut = min(full.index(first), full.index(second))
    assert _stopped(predictor, f" {second} , {first} ") == full[:cut]


def test_stop_sequence_that_never_occurs_changes_nothing(predictor: Any) -> None:
    full, _ = _greedy_reply(predictor)
    assert _stopped(predictor, json.dumps(["\u0000never\u0000"])) == full


TOOL_TEXT = "get_current_weather\n```python\ntool_call(location='北京', unit='celsius')\n```"
TOOL_CALL = {"tool_call": {"name": "get_current_weather", "arguments": {"location": "北京", "unit": "celsius"}}}


def _reply_chunks(text: str, pieces: list[str]) -> list[str]:
    from chatglm.text.reply import Chatglm3Reply

    reply = Chatglm3Reply()
    out = [reply.push(p) for p in pieces] + [reply.finish(), reply.tool_call]
    assert "".join(pieces) == text
    return [c for c in out if c]


@pytest.mark.parametrize("split", ["whole", "chars", "lines"])
def test_chatglm3_tool_call_is_one_json_chunk(split: str) -> None:
    pieces = {"whole": [TOOL_TEXT], "chars": list(TOOL_TEXT), "lines": TOOL_TEXT.splitlines(keepends=True)}[split]
    chunks = _reply_chunks(TOOL_TEXT, pieces)
    assert len(chunks) == 1
    assert json.loads(chunks[0]) == TOOL_CALL


def test_parse_tool_call_accepts_literals_only() -> None:
    from chatglm.text.reply import ToolCallParseError, parse_tool_call

    assert parse_tool_call("```python\ntool_call(location='北京', unit='celsius')\n```") == \
        {"location": "北京", "unit": "celsius"}
    assert parse_tool_call("tool_call(n=3, xs=[1, 2.5], d={'a': None}, t=True)") == \
        {"n": 3, "xs": [1, 2.5], "d": {"a": None}, "t": True}
    for bad in ["tool_call(1)", "print('x')", "tool_call(**{'a': 1})", "tool_call(a=open('/etc/passwd').read())",
                "tool_call(a=(lambda: 1)())", "tool_call(a=1); tool_call(b=2)", "tool_call(a="]:
        with pytest.raises(ToolCallParseError):
            parse_tool_call(bad)


def test_malicious_tool_call_is_never_executed(tmp_path: Path) -> None:
    from chatglm.text.reply import ToolCallParseError, parse_tool_call

    marker = tmp_path / "pwned"
    code = f"tool_call(a=__import__('os').system('touch {marker}'))"
    text = f"x\n{code}"
    chunks = _reply_chunks(text, list(text))
    assert len(chunks) == 1
    assert json.loads(chunks[0]) == {"tool_call": {"name": "x", "content": code}}
    with pytest.raises(ToolCallParseError):
        parse_tool_call(code)
    assert not marker.exists()


def test_chatglm3_ordinary_answer_drops_the_metadata_line() -> None:
    assert _reply_chunks("\n 你好！", ["\n", " 你", "好！"]) == ["你", "好！"]
    assert "".join(_reply_chunks("no newline at all", ["no new", "line at all"])) == "no newline at all"


def test_tool_call_through_predict(predictor3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that answers with a tool call: the whole predict() path returns one JSON chunk. The
    tiny random model never writes one, so its generated ids are replaced by the ids of TOOL_TEXT."""
    pipe = predictor3.pipe
    ids = pipe.tokenizer.encode(TOOL_TEXT)
    assert pipe.tokenizer.decode(ids) == TOOL_TEXT
    monkeypatch.setattr(pipe, "_generate", lambda *args, **kwargs: iter(ids))
    tools = json.dumps([{"name": "get_current_weather", "description": "Weather of a city",
                         "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}])
    chunks = predict_chunks(predictor3, prompt="北京天气怎么样", tools=tools)
    assert len(chunks) == 1
    assert json.loads(chunks[0]) == TOOL_CALL


def test_chatglm2_raw_prompt_equals_messages(predictor2: Any) -> None:
    greedy = {"temperature": 0.0, "max_tokens": 16}
    plain = predict_text(predictor2, prompt="你好", **greedy)
    assert predict_text(predictor2, prompt="[Round 1]\n\n问：你好\n\n答：", **greedy) == plain
    assert predict_text(predictor2, messages=json.dumps(HELLO), **greedy) == plain
    convo = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
             {"role": "user", "content": "今天天气怎么样"}]
    raw = "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：今天天气怎么样\n\n答："
    assert predict_text(predictor2, prompt=raw, **greedy) == \
        predict_text(predictor2, messages=json.dumps(convo, ensure_ascii=False), **greedy)


def test_chatglm3_raw_prompt_equals_messages(predictor3: Any) -> None:
    greedy = {"temperature": 0.0, "max_tokens": 16}
    system = "You are ChatGLM3, a helpful assistant."
    convo = [{"role": "system", "content": system}, {"role": "user", "content": "你好"}]
    expected = predict_text(predictor3, messages=json.dumps(convo, ensure_ascii=False), **greedy)
    assert expected == predictor3.pipe.chat(convo, max_new_tokens=16, temperature=0.0)
    raw = f"<|system|>\n{system}<|user|>\n你好<|assistant|>"
    assert predict_text(predictor3, prompt=raw, **greedy) == expected
    assert predict_text(predictor3, prompt="你好", system_prompt=system, **greedy) == expected
    assert predict_text(predictor3, prompt="<|user|>\n你好<|assistant|>", **greedy) == \
        predict_text(predictor3, prompt="你好", **greedy)


@pytest.fixture(scope="module")
def short_context_predictor(chatglm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The ChatGLM2 fixture with seq_length 64 in config.json."""
    model_dir = tmp_path_factory.mktemp("chatglm2-ctx64")
    for f in chatglm2_dir.iterdir():
        shutil.copyfile(f, model_dir / f.name)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["seq_length"] = 64
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return make_predictor(model_dir)


def test_prompt_longer_than_the_context(short_context_predictor: Any) -> None:
    with pytest.raises(ValueError, match="prompt") as info:
        predict_text(short_context_predictor, prompt="你好，" * 60, max_tokens=4)
    assert "64" in str(info.value)


def _fill_the_context(predictor: Any) -> tuple[str, Any]:
    from chatglm import GenerationStats

    stats = GenerationStats()
    text = "".join(predictor.pipe.stream(HELLO, max_new_tokens=100, temperature=1.0, seed=4, stats=stats,
                                         **DEFAULT_SAMPLING))
    return text, stats


def test_answer_is_cut_where_the_context_ends(short_context_predictor: Any) -> None:
    text, stats = _fill_the_context(short_context_predictor)
    assert stats.input_tokens + stats.output_tokens == 64
    assert predict_text(short_context_predictor, prompt="你好", max_tokens=100, temperature=1.0, seed=4) == text


def test_context_full_stop_reason(short_context_predictor: Any) -> None:
    _, stats = _fill_the_context(short_context_predictor)
    assert stats.stop_reason == "context_full"


BAD_INPUTS = [
    pytest.param("chatglm2", {"messages": '[{"role": "user", "content": "hi"'}, ["messages", "JSON"], id="messages-json"),
    pytest.param("chatglm2", {"messages": '{"role": "user", "content": "hi"}'}, ["messages", "list"], id="messages-dict"),
    pytest.param("chatglm2", {"messages": "[]"}, ["messages", "empty"], id="messages-empty"),
    pytest.param("chatglm2", {"messages": '["hi"]'}, ["messages[0]"], id="messages-item"),
    pytest.param("chatglm2", {"prompt": "hi", "messages": '[{"role": "user", "content": "hi"}]'},
                 ["prompt", "messages"], id="prompt-and-messages"),
    pytest.param("chatglm2", {"prompt": ""}, ["prompt", "empty"], id="prompt-empty"),
    pytest.param("chatglm2", {"prompt": "  \n "}, ["prompt", "empty"], id="prompt-blank"),
    pytest.param("chatglm2", {"prompt": "hi", "tools": "[]"}, ["tools", "ChatGLM3"], id="tools-chatglm2"),
    pytest.param("chatglm3", {"prompt": "hi", "tools": "{"}, ["tools", "JSON"], id="tools-json"),
    pytest.param("chatglm2", {"prompt": "hi", "stop_sequences": '["a", 1]'}, ["stop_sequences"], id="stop-list"),
    pytest.param("chatglm3", {"system_prompt": "be nice",
                              "messages": '[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]'},
                 ["system_prompt"], id="two-system-prompts"),
    pytest.param("chatglm2", {"messages": '[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]'},
                 ["messages[0]", "system"], id="system-role-chatglm2"),
    pytest.param("chatglm3", {"prompt": "<|user|>你好<|assistant|>"}, ["prompt", "newline"], id="raw-no-newline"),
    pytest.param("chatglm2", {"prompt": "hi", "seed": -1}, ["seed"], id="seed-negative"),
]


@pytest.mark.parametrize("family,inputs,words", BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_field(request: pytest.FixtureRequest, family: str,
                                                       inputs: dict, words: list[str]) -> None:
    predictor = request.getfixturevalue("predictor2" if family == "chatglm2" else "predictor3")
    with pytest.raises(ValueError) as info:
        predict_text(predictor, max_tokens=4, **inputs)
    for word in words:
        assert word in str(info.value)


def test_each_prediction_releases_its_threads_openmp_pool(predictor2: Any, monkeypatch) -> None:
    """coglet runs each predict() on a new thread: each must leave no OpenMP pool behind, also when
    it fails (see chatglm/serving/openmp.py)."""
    import predict
    calls: list[str] = []
    monkeypatch.setattr(predict, "release_thread_pool", lambda: calls.append("released"))
    predict_chunks(predictor2, prompt="你好", max_tokens=3)
    assert calls == ["released"]
    with pytest.raises(Exception, match="prompt"):
        predict_chunks(predictor2, prompt="   ")
    assert calls == ["released", "released"]
