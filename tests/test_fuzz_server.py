"""Fuzzing the real Cog HTTP servers (cog 0.16.12 and coglet 0.23.1, see tests/cogserver.py) with
schemathesis, from the server's own /openapi.json, and the JSON structure inside ``messages`` and
``tools`` with generated lists of objects of odd types, depths and keys; on the tiny ChatGLM3 fixture
with a 64-token context (so that every prediction is short). Bounded in examples and in total time.

What must hold for every generated request: no 5xx; a prediction answer is either a success or a
well-formed failure whose message names the input at fault; a 422 names the field; an input that
breaks the schema gets a 422 naming it. Afterwards the server is READY and a normal prediction
gives the right answer.

Strings are generated as valid Unicode only (``codec="utf-8"``: no lone surrogates). cog 0.16
echoes the input in its response and answers 500 for a lone surrogate whatever predict() does;
that case is tested on its own in test_reliability.py
(``test_invalid_utf8_body_is_400_and_lone_surrogate_is_500_but_the_server_survives``).

Generation is derandomized (the same cases every run); CHATGLM_FUZZ_EXAMPLES and CHATGLM_FUZZ_SECONDS
raise the bounds for a longer local run.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.cogserver import SLOT_RELEASE_S, RUNTIMES, CogServer, local_session, skip_without_coglet
from tests.predict_helpers import make_predictor, predict_chunks
from tests.reliability_helpers import USER_ERROR, short_context_copy

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in requirements-dev.txt")
hypothesis = pytest.importorskip("hypothesis")

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")

EXAMPLES = int(os.environ.get("CHATGLM_FUZZ_EXAMPLES", "60"))  # per operation and generation mode
BUDGET_S = float(os.environ.get("CHATGLM_FUZZ_SECONDS", "45"))  # for all generated requests together
REQUEST_TIMEOUT_S = 30.0  # a request that takes longer counts as a hang
GREEDY = {"prompt": "你好", "temperature": 0, "max_tokens": 12}
PREDICTION_PATHS = ("/predictions", "/predictions/{prediction_id}")
COGLET_ENVELOPE_422 = "Failed to deserialize the JSON body into the target type: "


@pytest.fixture(scope="module")
def model_dir(chatglm3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return short_context_copy(chatglm3_dir, tmp_path_factory.mktemp("chatglm3-ctx64"), 64)


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request: pytest.FixtureRequest, model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    if request.param == "coglet":
        skip_without_coglet()
    srv = CogServer(model_dir, tmp_path_factory.mktemp(f"{request.param}-fuzz") / "server.log", runtime=request.param)
    try:
        srv.wait_ready(timeout=120)
        yield srv
    finally:
        srv.stop()


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _number_breaks(spec: dict[str, Any], value: Any) -> bool:
    """Whether ``value`` surely fails a number/integer input of ``spec`` under pydantic's lax mode.
    Strings and booleans are left out: pydantic may coerce them ("5" is accepted for an int)."""
    if value is None:
        return not spec.get("nullable", False)
    if isinstance(value, (list, dict)):
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if spec["type"] == "integer" and isinstance(value, float) and not value.is_integer():
        return True
    return not spec.get("minimum", value) <= value <= spec.get("maximum", value)


def expected_422_fields(body: Any, input_props: dict[str, Any], runtime: str = "cog") -> list[tuple[Any, ...]]:
    """The locations (``("body", "input", "max_tokens")``...) that a JSON request body surely gets
    a 422 for, as far as the schema says: wrong types and numbers out of range. coglet does not
    look at ``output_file_prefix`` (nor ``created_at``): any value passes there."""
    if not isinstance(body, dict):
        return []
    bad: list[tuple[Any, ...]] = []
    inputs = body.get("input")
    if inputs is not None and not isinstance(inputs, dict):
        bad.append(("body", "input"))
    for name, spec in (input_props.items() if isinstance(inputs, dict) else ()):
        if name not in inputs:
            continue
        value = inputs[name]
        broken = not isinstance(value, str) if spec["type"] == "string" else _number_breaks(spec, value)
        if broken:
            bad.append(("body", "input", name))
    for name in ("id", "output_file_prefix") if runtime == "cog" else ("id",):
        if body.get(name) is not None and not isinstance(body[name], str):
            bad.append(("body", name))
    context = body.get("context")
    if context is not None and (not isinstance(context, dict) or not all(isinstance(v, str) for v in context.values())):
        bad.append(("body", "context"))
    events = body.get("webhook_events_filter")
    if events is not None and (not isinstance(events, list) or
                               not all(e in ("start", "output", "logs", "completed") for e in events)):
        bad.append(("body", "webhook_events_filter"))
    return bad


class Fuzzer:
    """Sends generated cases to ``server`` and checks every answer; counts what it saw."""

    def __init__(self, server: CogServer, input_props: dict[str, Any]) -> None:
        self.server = server
        self.input_props = input_props
        self.seen: collections.Counter[str] = collections.Counter()

    def run(self, case: Any) -> None:
        # Nothing may leave 127.0.0.1: a generated "webhook" URL is dropped. The "Prefer" header is
        # dropped too, so every prediction is synchronous and its answer is the prediction itself.
        if isinstance(case.body, dict):
            case.body.pop("webhook", None)
        for key in [k for k in (case.headers or {}) if k.lower() == "prefer"]:
            del case.headers[key]
        deadline = time.monotonic() + SLOT_RELEASE_S
        with local_session() as session:
            response = case.call(base_url=self.server.url, session=session, timeout=REQUEST_TIMEOUT_S)
            # coglet's just-freed slot (see CogServer.submit): only one prediction runs at a time here.
            while (response.status_code == 409 and self.server.runtime == "coglet"
                   and case.path in PREDICTION_PATHS and time.monotonic() < deadline):
                self.seen["409 of coglet's just-freed slot, retried"] += 1
                time.sleep(0.01)
                response = case.call(base_url=self.server.url, session=session, timeout=REQUEST_TIMEOUT_S)
        label = f"{case.method} {case.path}"
        self.seen[f"{label} {response.status_code}"] += 1
        context = f"{label} body={case.body!r:.400} -> {response.status_code} {response.text[:600]}"
        if _has_surrogate(case.body):
            self.seen["surrogate"] += 1
            assert response.status_code in (200, 422, 500), context
            return
        assert response.status_code < 500, context
        json_body = case.media_type in (None, "application/json") and isinstance(case.body, dict)
        expected = expected_422_fields(case.body, self.input_props, self.server.runtime) if json_body else []
        if response.status_code == 422 and self.server.runtime == "coglet" and \
                response.text.startswith(COGLET_ENVELOPE_422):
            # coglet refuses a body that is not an object, or an envelope field of the wrong type
            # (null webhook_events_filter, a number for id...), before looking at the input, in
            # plain text naming the field.
            field = re.match(r"\w*", response.text[len(COGLET_ENVELOPE_422):]).group()
            assert not isinstance(case.body, dict) or field in case.body, f"422 names no field sent: {context}"
            self.seen["422 naming the request field (coglet, plain text)"] += 1
        elif response.status_code == 422:
            self._check_422(case, response.json(), expected, context)
        else:
            assert not expected, f"invalid {expected} not refused with 422: {context}"
        if case.path in PREDICTION_PATHS and response.status_code == 200:
            self._check_prediction(response.json(), context)
        if case.path in PREDICTION_PATHS:
            # 404/405: a generated prediction id that does not route (such as "..") on PUT only.
            allowed = (200, 400, 415, 422) + ((404, 405) if case.method == "PUT" else ())
            assert response.status_code in allowed, context

    def _check_422(self, case: Any, body: Any, expected: list[tuple[Any, ...]], context: str) -> None:
        details = body.get("detail") if isinstance(body, dict) else None
        assert isinstance(details, list) and details, context
        locations = [tuple(d["loc"]) for d in details]
        for loc, detail in zip(locations, details, strict=True):
            assert loc and loc[0] in ("body", "path", "header", "query") and detail.get("msg"), context
            if loc[0] == "body" and len(loc) >= 2 and isinstance(case.body, dict):
                assert loc[1] in case.body or isinstance(loc[1], int), f"422 names no field sent: {context}"
            if loc[:2] == ("body", "input") and len(loc) >= 3:
                # coglet names an "input" that is not an object as its "__root__" (README: Errors and limits).
                whole = loc[2] == "__root__" and self.server.runtime == "coglet" and isinstance(case.body, dict) \
                    and not isinstance(case.body.get("input"), dict)
                assert whole or loc[2] in self.input_props, f"422 names an unknown input: {context}"
        for loc in expected:
            assert any(found[:len(loc)] == loc for found in locations), f"422 does not name {loc}: {context}"
        self.seen["422 naming the field"] += 1

    def _check_prediction(self, body: dict[str, Any], context: str) -> None:
        assert body.get("status") in ("succeeded", "failed"), context
        if body["status"] == "failed":
            assert isinstance(body.get("error"), str), context
            error = self.server.error_message(body)
            assert USER_ERROR.match(error), f"not a caller's error: {context}"
            self.seen["failed: " + error.split(":")[0][:30]] += 1
        else:
            assert isinstance(body.get("output"), list) and all(isinstance(c, str) for c in body["output"]), context
            self.seen["succeeded"] += 1


def _drive(strategy: Any, deadline: float, check: Callable[[Any], None]) -> None:
    """Run ``check`` on up to EXAMPLES cases of ``strategy``, skipping the rest after ``deadline``."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        if time.monotonic() < deadline:
            check(case)

    run()


def _generating_schema(raw: dict[str, Any]) -> dict[str, Any]:
    """The server's schema narrowed to requests that reach the model: a non-empty prompt, no
    messages or tools (random text there is rarely valid JSON), every other input as published."""
    narrowed = copy.deepcopy(raw)
    inputs = narrowed["components"]["schemas"]["Input"]
    inputs["properties"]["prompt"]["minLength"] = 1
    for name in ("messages", "tools"):
        del inputs["properties"][name]
    inputs["required"] = ["prompt"]
    inputs["additionalProperties"] = False
    request = narrowed["components"]["schemas"]["PredictionRequest"]
    request["required"] = ["input"]
    request["properties"]["input"].pop("nullable", None)
    return narrowed


def test_fuzz_the_server_from_its_openapi_schema(server: CogServer, model_dir: Path) -> None:
    from schemathesis.config import SchemathesisConfig
    from schemathesis.generation import GenerationMode

    expected = predict_chunks(make_predictor(model_dir), **GREEDY)
    raw = server.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw, config=SchemathesisConfig())
    schema.config.generation.update(codec="utf-8")
    fuzzer = Fuzzer(server, raw["components"]["schemas"]["Input"]["properties"])
    operations = [("/predictions", "POST", GenerationMode.POSITIVE), ("/predictions", "POST", GenerationMode.NEGATIVE),
                  ("/predictions/{prediction_id}", "PUT", GenerationMode.POSITIVE),
                  ("/predictions/{prediction_id}", "PUT", GenerationMode.NEGATIVE),
                  ("/predictions/{prediction_id}/cancel", "POST", GenerationMode.POSITIVE),
                  ("/health-check", "GET", GenerationMode.POSITIVE), ("/", "GET", GenerationMode.POSITIVE)]
    started = time.monotonic()
    deadline = started + BUDGET_S
    for path, method, mode in operations:  # POST /shutdown is left out: it stops the server
        _drive(schema[path][method].as_strategy(generation_mode=mode), deadline, fuzzer.run)
    generating = schemathesis.openapi.from_dict(_generating_schema(raw), config=SchemathesisConfig())
    generating.config.generation.update(codec="utf-8")
    _drive(generating["/predictions"]["POST"].as_strategy(generation_mode=GenerationMode.POSITIVE), deadline,
           fuzzer.run)
    seconds = time.monotonic() - started
    print(f"\nfuzz: {sum(v for k, v in fuzzer.seen.items() if k.startswith(('GET', 'PUT', 'POST')))} requests "
          f"in {seconds:.1f} s: {dict(sorted(fuzzer.seen.items()))}")
    assert fuzzer.seen["succeeded"] and fuzzer.seen["422 naming the field"], fuzzer.seen
    assert not fuzzer.seen["surrogate"], "codec='utf-8' should never generate a lone surrogate"

    server.wait_idle(timeout=30)  # coglet frees its slot a few ms after its last answer
    assert server.proc.poll() is None
    body = server.predict(GREEDY)
    assert body["status"] == "succeeded", body.get("error")
    assert body["output"] == expected


def _json_structure_strategy() -> Any:
    """Request inputs whose ``messages`` and ``tools`` are generated JSON: lists of objects with odd
    types, depths and keys (roles that are lists or objects, null or nested content, metadata and
    tools anywhere), sometimes wrapped thousands of levels deep."""
    from hypothesis import strategies as st

    leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
    value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=3)
                         | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=12)
    role = st.sampled_from(["system", "user", "assistant", "observation", "bot", "", "USER"]) | value
    text = st.text(max_size=24)
    known = st.fixed_dictionaries({}, optional={"role": role, "content": text | value, "metadata": text | value,
                                                "tools": value})
    message = st.tuples(known, st.dictionaries(st.text(max_size=5), value, max_size=2)).map(
        lambda parts: {**parts[1], **parts[0]})
    tool = st.fixed_dictionaries({}, optional={"name": text | value, "description": text | value,
                                               "parameters": value})
    messages = st.lists(message | value, max_size=4).map(json.dumps)
    tools = (st.lists(tool | value, max_size=3).map(json.dumps) | st.just(""))

    def deepen(args: tuple[str, int]) -> str:
        text, depth = args
        return "[" * depth + text + "]" * depth

    valid = st.lists(st.builds(lambda c: {"role": "user", "content": c}, text), min_size=1, max_size=2).map(json.dumps)
    messages = valid | messages | st.tuples(messages, st.integers(60, 5000)).map(deepen)
    tools = tools | st.tuples(tools, st.integers(60, 5000)).map(deepen)
    return st.fixed_dictionaries({"messages": messages, "tools": tools,
                                  "system_prompt": st.sampled_from(["", "be brief"]),
                                  "max_tokens": st.just(2), "temperature": st.just(0)})


def test_fuzz_the_json_inside_messages_and_tools(server: CogServer) -> None:
    """Every generated structure is a success or a failed prediction naming the input at fault."""
    from hypothesis import HealthCheck, Phase, given, settings

    seen: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + BUDGET_S

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(inputs=_json_structure_strategy())
    def run(inputs: dict[str, Any]) -> None:
        if time.monotonic() > deadline:
            return
        body = server.predict(inputs)
        context = f"{json.dumps(inputs)[:400]} -> {json.dumps(body)[:600]}"
        assert body["status"] in ("succeeded", "failed"), context
        if body["status"] == "failed":
            error = server.error_message(body)
            assert USER_ERROR.match(error), f"not a caller's error: {context}"
            seen["failed: " + error.split(":")[0][:30]] += 1
        else:
            seen["succeeded"] += 1

    run()
    print(f"\njson fuzz on {server.runtime}: {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 10 and any(k.startswith("failed: messages") for k in seen), seen
    server.wait_idle(timeout=30)
    assert server.proc.poll() is None
