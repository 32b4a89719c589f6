"""The real Cog HTTP server (cog 0.16's ``python -m cog.server.http``) serving the tiny fixture
models on 127.0.0.1: schema, sync and async (webhook) predictions, cancel, 422s and failures."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.cogserver import CogServer, WebhookReceiver
from tests.predict_helpers import make_predictor, predict_chunks

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")

GREEDY = {"prompt": "你好", "temperature": 0, "max_tokens": 16}
ASYNC = {"Prefer": "respond-async"}


def _start(model_dir: Path, log_path: Path) -> CogServer:
    server = CogServer(model_dir, log_path, extra_env={"COG_THROTTLE_RESPONSE_INTERVAL": "0.1"})
    try:
        server.wait_ready(timeout=120)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(chatglm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    srv = _start(chatglm2_dir, tmp_path_factory.mktemp("cog-chatglm2") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference2(chatglm2_dir: Path) -> Any:
    return make_predictor(chatglm2_dir)


def test_openapi_schema_has_the_inputs_and_bounds(server: CogServer) -> None:
    schema = server.get("/openapi.json").json()
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert set(props) == {"prompt", "system_prompt", "messages", "tools", "max_tokens", "temperature", "top_p",
                          "top_k", "repetition_penalty", "stop_sequences", "seed"}
    bounds = {name: (props[name].get("minimum"), props[name].get("maximum"), props[name].get("default"))
              for name in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")}
    assert bounds == {"max_tokens": (1, 32768, 2048), "temperature": (0, 2, 0.8), "top_p": (0, 1, 0.8),
                      "top_k": (0, 65024, 50), "repetition_penalty": (0.01, 10, 1.0), "seed": (0, 2**32 - 1, None)}
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
    assert body["metrics"]["output_token_count"] <= 16
    assert "seed:" in body["logs"]


def test_async_prediction_streams_output_webhooks(server: CogServer, webhooks: WebhookReceiver) -> None:
    inputs = {"prompt": "你好", "temperature": 0, "max_tokens": 128}
    sync_output = server.predict(inputs)["output"]
    prediction_id = f"async-{uuid.uuid4().hex[:12]}"
    response = server.post("/predictions", {"id": prediction_id, "input": inputs, "webhook": webhooks.url,
                                            "webhook_events_filter": ["start", "output", "completed"]},
                           headers=ASYNC)
    assert response.status_code == 202, response.text
    events = webhooks.wait_terminal(prediction_id, timeout=60)
    assert events[-1]["status"] == "succeeded"
    assert [e["status"] for e in events[:-1]] == ["processing"] * (len(events) - 1)
    assert any(not e.get("output") for e in events[:-1]), "no start event (empty output) was posted"
    # cog 0.16 posts the start event from the request thread and output events from the event loop
    # thread, so the start event may arrive after the first output event; output events are ordered.
    outputs = [e["output"] for e in events if e.get("output")]
    for before, after in zip(outputs, outputs[1:]):
        assert after[:len(before)] == before, "an output webhook is not an extension of the previous one"
    assert outputs[-1] == sync_output
    assert len(outputs) >= 2, "expected at least one intermediate output event"
    server.wait_idle()


def test_cancel_a_running_prediction(server: CogServer, webhooks: WebhookReceiver, reference2: Any) -> None:
    prediction_id = f"cancel-{uuid.uuid4().hex[:12]}"
    inputs = {"prompt": "你好", "temperature": 1, "max_tokens": 2000, "seed": 11}
    response = server.put(f"/predictions/{prediction_id}",
                          {"input": inputs, "webhook": webhooks.url,
                           "webhook_events_filter": ["start", "output", "completed"]}, headers=ASYNC)
    assert response.status_code == 202, response.text
    webhooks.wait_for(prediction_id, lambda ev: any(e.get("output") for e in ev), timeout=60)
    busy = server.post("/predictions", {"input": GREEDY})
    assert busy.status_code == 409 and busy.json() == {"detail": "Already running a prediction"}
    cancel = server.post(f"/predictions/{prediction_id}/cancel", None)
    assert cancel.status_code == 200, cancel.text
    events = webhooks.wait_terminal(prediction_id, timeout=60)
    assert events[-1]["status"] == "canceled"
    assert len("".join(events[-1].get("output") or [])) > 0
    server.wait_idle()
    assert server.post(f"/predictions/{prediction_id}/cancel", None).status_code == 404
    body = server.predict(GREEDY)
    assert body["status"] == "succeeded", body.get("error")
    assert body["output"] == predict_chunks(reference2, **GREEDY)


@pytest.mark.parametrize("field,value", [("temperature", 5), ("max_tokens", 0), ("top_p", 2),
                                         ("max_tokens", "abc"), ("top_k", -1), ("seed", -1),
                                         ("repetition_penalty", 0), ("max_tokens", 4.5)])
def test_invalid_input_is_422_naming_the_field(server: CogServer, field: str, value: Any) -> None:
    response = server.post("/predictions", {"input": {"prompt": "你好", field: value}})
    assert response.status_code == 422, response.text
    locations = [tuple(d["loc"]) for d in response.json()["detail"]]
    assert ("body", "input", field) in locations


def test_invalid_messages_json_fails_with_a_clear_error(server: CogServer) -> None:
    body = server.predict({"messages": '[{"role": "user", "content": "hi"', "max_tokens": 4})
    assert body["status"] == "failed"
    assert "messages" in body["error"] and "JSON" in body["error"]
    server.wait_idle()
    assert server.predict(GREEDY)["status"] == "succeeded"


def test_chatglm3_server_sync_prediction(chatglm3_dir: Path, tmp_path: Path) -> None:
    reference = make_predictor(chatglm3_dir)
    srv = _start(chatglm3_dir, tmp_path / "server.log")
    try:
        body = srv.predict(GREEDY)
        assert body["status"] == "succeeded", body.get("error")
        assert body["output"] == predict_chunks(reference, **GREEDY)
        system = srv.predict({**GREEDY, "system_prompt": "You are a helpful assistant."})
        assert system["status"] == "succeeded", system.get("error")
        failed = srv.predict({**GREEDY, "tools": "not json"})
        assert failed["status"] == "failed" and "tools" in failed["error"]
    finally:
        srv.stop()
