"""The real Cog HTTP servers serving the tiny fixture models on 127.0.0.1, under both runtimes (see
tests/cogserver.py): cog 0.16.12's Python server and coglet 0.23.1, the one today's `cog build`
ships. Schema, sync and async (webhook) predictions, cancel, at-capacity, 422s, failures, metrics.
Where the runtimes differ, each test accepts exactly the answer the README's "Errors and limits"
documents for that runtime."""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cogserver import RUNTIMES, CogServer, WebhookReceiver, final_event, skip_without_coglet
from tests.predict_helpers import make_predictor, predict_chunks

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")

GREEDY = {"prompt": "你好", "temperature": 0, "max_tokens": 16}
ASYNC = {"Prefer": "respond-async"}


def start_server(model_dir: Path, log_path: Path, runtime: str) -> CogServer:
    """A READY server of ``runtime`` (skipped for coglet where .venv-coglet is absent, outside CI)."""
    if runtime == "coglet":
        skip_without_coglet()
    server = CogServer(model_dir, log_path, extra_env={"COG_THROTTLE_RESPONSE_INTERVAL": "0.1"}, runtime=runtime)
    try:
        server.wait_ready(timeout=120)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request: pytest.FixtureRequest, chatglm2_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    srv = start_server(chatglm2_dir, tmp_path_factory.mktemp(f"{request.param}-chatglm2") / "server.log",
                       request.param)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference2(chatglm2_dir: Path) -> Any:
    return make_predictor(chatglm2_dir)


def test_openapi_schema_has_the_inputs_and_bounds(server: CogServer) -> None:
    schema = server.get("/openapi.json").json()
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert set(props) == {"prompt", "system_prompt", "messages", "tools", "max_tokens", "temperature", "top_p",
                          "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens",
                          "stop_sequences", "seed"}
    bounds = {name: (props[name].get("minimum"), props[name].get("maximum"), props[name].get("default"))
              for name in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                           "frequency_penalty", "min_tokens", "seed")}
    assert bounds == {"max_tokens": (1, 32768, 2048), "temperature": (0, 2, 0.8), "top_p": (0, 1, 0.8),
                      "top_k": (0, 65024, 50), "repetition_penalty": (0.01, 10, 1.0), "presence_penalty": (0, 2, 0.0),
                      "frequency_penalty": (0, 2, 0.0), "min_tokens": (0, 32768, 0), "seed": (0, 2**32 - 1, None)}
    assert props["max_tokens"]["type"] == "integer"
    assert props["temperature"]["type"] == "number"
    for name in ("prompt", "system_prompt", "messages", "tools", "stop_sequences"):
        assert props[name]["type"] == "string" and props[name]["default"] == ""
    assert not schema["components"]["schemas"]["Input"].get("required")
    output = schema["components"]["schemas"]["Output"]
    assert output["type"] == "array" and output["items"]["type"] == "string"
    assert output.get("x-cog-array-display") == "concatenate"


def test_sync_prediction_equals_in_process_predictor(server: CogServer, reference2: Any) -> None:
    body = server.predict(GREEDY)
    assert body["status"] == "succeeded", body.get("error")
    assert isinstance(body["output"], list) and all(isinstance(c, str) for c in body["output"])
    expected = predict_chunks(reference2, **GREEDY)
    assert "".join(body["output"]) == "".join(expected)
    assert body["output"] == expected
    metrics = body["metrics"]
    assert metrics["output_token_count"] == GREEDY["max_tokens"] and metrics["input_token_count"] > 0
    assert metrics["time_to_first_token"] > 0 and metrics["tokens_per_second"] > 0
    assert f"{metrics['output_token_count']} output tokens, stop: max_tokens" in server.prediction_log(body)


def test_async_prediction_streams_output_webhooks(server: CogServer, webhooks: WebhookReceiver) -> None:
    # Long enough to outlast cog 0.16's webhook throttling (one output event per 0.5 s at most).
    inputs = {"prompt": "你好", "temperature": 0, "max_tokens": 600}
    sync_output = server.predict(inputs)["output"]
    prediction_id = f"async-{uuid.uuid4().hex[:12]}"
    response = server.submit({"id": prediction_id, "input": inputs, "webhook": webhooks.url,
                              "webhook_events_filter": ["start", "output", "completed"]}, headers=ASYNC)
    assert response.status_code == 202, response.text
    events = webhooks.wait_terminal(prediction_id, timeout=60)
    final = final_event(events)
    assert final["status"] == "succeeded"
    others = [e for e in events if e is not final]
    assert [e["status"] for e in others] == ["processing"] * len(others)
    assert any(not e.get("output") for e in others), "no start event (empty output) was posted"
    outputs = [e["output"] for e in events if e.get("output")]
    if server.runtime == "cog":
        # cog 0.16 posts the start event from the request thread and output events from the event
        # loop thread, so the start event may arrive after any other; output events and the
        # terminal one arrive in order.
        assert [e for e in events if e.get("output")][-1] is final
    else:
        # coglet posts webhooks concurrently: they may arrive in any order, each with the whole
        # output so far, so ordered by length they must extend each other.
        outputs.sort(key=len)
    for before, after in zip(outputs, outputs[1:]):
        assert after[:len(before)] == before, "an output webhook is not an extension of the previous one"
    assert outputs[-1] == sync_output
    assert len(outputs) >= 3, "expected at least one intermediate output event"
    assert final["output"] == sync_output
    # Tokens, not chunks: a token that ends inside a character is held and joins the next chunk.
    assert final["metrics"]["output_token_count"] == inputs["max_tokens"]
    server.wait_idle()


def test_cancel_a_running_prediction(server: CogServer, webhooks: WebhookReceiver, reference2: Any) -> None:
    prediction_id = f"cancel-{uuid.uuid4().hex[:12]}"
    inputs = {"prompt": "你好", "temperature": 1, "max_tokens": 2000, "seed": 11}
    response = server.submit({"input": inputs, "webhook": webhooks.url,
                              "webhook_events_filter": ["start", "output", "completed"]},
                             headers=ASYNC, prediction_id=prediction_id)
    assert response.status_code == 202, response.text
    webhooks.wait_for(prediction_id, lambda ev: any(e.get("output") for e in ev), timeout=60)
    busy = server.post("/predictions", {"input": GREEDY})
    assert busy.status_code == 409 and busy.json() == server.busy_answer
    cancel = server.post(f"/predictions/{prediction_id}/cancel", None)
    assert cancel.status_code == 200, cancel.text
    final = final_event(webhooks.wait_terminal(prediction_id, timeout=60))
    assert final["status"] == "canceled"
    assert len("".join(final.get("output") or [])) > 0
    line = re.compile(r"seed: 11; \d+ input tokens, \d+ output tokens, stop: cancelled")
    deadline = time.monotonic() + 5
    # Under load cog 0.16's final webhook can go out before the prediction's last log line: the
    # server's own log has it then.
    while not line.search(final["logs"] or "") and not line.search(server.log_tail(20000)):
        assert time.monotonic() < deadline, f"no cancel line in the logs: {final['logs']!r}"
        time.sleep(0.1)
    server.wait_idle()
    assert server.post(f"/predictions/{prediction_id}/cancel", None).status_code == 404
    body = server.predict(GREEDY)
    assert body["status"] == "succeeded", body.get("error")
    assert body["output"] == predict_chunks(reference2, **GREEDY)


@pytest.mark.parametrize("field,value", [("temperature", 5), ("max_tokens", 0), ("top_p", 2),
                                         ("max_tokens", "abc"), ("top_k", -1), ("seed", -1),
                                         ("seed", 2**32), ("repetition_penalty", 0), ("max_tokens", 4.5),
                                         ("prompt", 5), ("messages", ["a"])])
def test_invalid_input_is_422_naming_the_field(server: CogServer, field: str, value: Any) -> None:
    response = server.submit({"input": {"prompt": "你好", field: value}})
    assert response.status_code == 422, response.text
    locations = [tuple(d["loc"]) for d in response.json()["detail"]]
    assert ("body", "input", field) in locations


def test_whole_float_for_an_integer_is_that_integer(server: CogServer, reference2: Any) -> None:
    """cog 0.16.12 converts 16.0 to 16; coglet passes 16.0 on (JSON Schema counts it as an
    integer) and predict() converts it."""
    body = server.predict({**GREEDY, "max_tokens": 16.0, "top_k": 50.0})
    assert body["status"] == "succeeded", body.get("error")
    assert body["output"] == predict_chunks(reference2, **GREEDY)


def test_invalid_messages_json_fails_with_a_clear_error(server: CogServer) -> None:
    body = server.predict({"messages": '[{"role": "user", "content": "hi"', "max_tokens": 4})
    assert body["status"] == "failed"
    message = server.error_message(body)
    assert message.startswith("messages: not valid JSON"), message
    assert "stop: failed (InputError: messages: not valid JSON" in server.prediction_log(body)
    server.wait_idle()
    assert server.predict(GREEDY)["status"] == "succeeded"


def test_replicate_llm_inputs_over_http(server: CogServer, reference2: Any) -> None:
    """The three inputs reach the engine (min_tokens' masking itself is tested in test_sampling.py
    and test_scheduler.py): the penalties give the in-process answer, min_tokens = max_tokens runs to
    the end, a min_tokens above max_tokens fails naming it, and out-of-range values are 422."""
    held = server.predict({**GREEDY, "max_tokens": 40, "min_tokens": 40})
    assert held["status"] == "succeeded" and held["metrics"]["output_token_count"] == 40
    server.wait_idle()
    penalised = {**GREEDY, "max_tokens": 24, "presence_penalty": 1.5, "frequency_penalty": 0.7}
    body = server.predict(penalised)
    assert body["status"] == "succeeded" and body["output"] == predict_chunks(reference2, **penalised)
    server.wait_idle()
    bad = server.predict({**GREEDY, "max_tokens": 4, "min_tokens": 5})
    assert bad["status"] == "failed" and server.error_message(bad).startswith("min_tokens: must be at most max_tokens")
    server.wait_idle()
    for name, value in (("presence_penalty", 2.5), ("frequency_penalty", -0.5), ("min_tokens", 40000)):
        assert server.post("/predictions", {"input": {**GREEDY, name: value}}).status_code == 422, name


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_chatglm3_server_sync_prediction(chatglm3_dir: Path, tmp_path: Path, runtime: str) -> None:
    reference = make_predictor(chatglm3_dir)
    srv = start_server(chatglm3_dir, tmp_path / "server.log", runtime)
    try:
        body = srv.predict(GREEDY)
        assert body["status"] == "succeeded", body.get("error")
        assert body["output"] == predict_chunks(reference, **GREEDY)
        system = srv.predict({**GREEDY, "system_prompt": "You are a helpful assistant."})
        assert system["status"] == "succeeded", system.get("error")
        failed = srv.predict({**GREEDY, "tools": "not json"})
        assert failed["status"] == "failed" and srv.error_message(failed).startswith("tools: not valid JSON")
        tools = srv.predict({**GREEDY, "tools": '[{"name": "f"}]'})
        assert tools["status"] == "succeeded", tools.get("error")
        assert "warning: tools: ChatGLM3-6B-32K was not trained for tool calls" in srv.prediction_log(tools)
    finally:
        srv.stop()
