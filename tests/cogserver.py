"""Runs the real Cog HTTP servers on 127.0.0.1 for tests, and a small webhook receiver that collects
what a server posts.

Two runtimes: ``cog`` is cog 0.16.12's Python server (``python -m cog.server.http`` in the main
environment; it reads cog.yaml), ``coglet`` the Rust server that today's ``cog build`` ships (cog and
coglet 0.23.1 in ``.venv-coglet``, made by the README's setup command and by .ci/run). coglet does
not read cog.yaml and validates inputs only against ``.cog/openapi_schema.json``, which ``cog build``
writes; here that file is the schema cog 0.16.12 builds for the same predict.py
(``python -m cog.command.openapi_schema``), written before each coglet server starts."""
from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from tests.predict_helpers import PROXY_VARS

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("succeeded", "failed", "canceled")
HTTP_TIMEOUT = 60.0
RUNTIMES = ("cog", "coglet")
COGLET_VENV = ROOT / ".venv-coglet"
COGLET_PYTHON = COGLET_VENV / "bin" / "python"
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"
# coglet wraps the message of an exception raised by predict() in this (the exception's class name
# in the group); cog 0.16.12's "error" is the message itself.
COGLET_FAILURE = re.compile(r"Prediction failed: Generator iteration error: (\w+): ")
SLOT_RELEASE_S = 1.0  # measured: at most ~60 ms between a runtime's answer and its free slot
# What each runtime answers a prediction request while another one runs.
BUSY = {"cog": {"detail": "Already running a prediction"},
        "coglet": {"error": "At capacity - all prediction slots busy", "status": "failed"}}


def skip_without_coglet() -> None:
    """Skip the calling test when .venv-coglet is absent (a bare clone); in CI it must be there."""
    import pytest

    if COGLET_PYTHON.is_file():
        return
    reason = (f"{COGLET_PYTHON} not found: the coglet runtime is installed by the README's setup command "
              "(pip install -r requirements-coglet.txt into .venv-coglet)")
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI must install it (.ci/run)")
    pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def build_schema() -> dict[str, Any]:
    """The OpenAPI schema cog 0.16.12 builds for predict.py (what `cog build` would write)."""
    done = subprocess.run([sys.executable, "-m", "cog.command.openapi_schema"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k not in PROXY_VARS})
    if done.returncode != 0:
        raise RuntimeError(f"cog.command.openapi_schema failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def write_schema() -> Path:
    """Write .cog/openapi_schema.json (git-ignored) for coglet; unchanged content is not rewritten."""
    text = json.dumps(build_schema(), indent=2) + "\n"
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    if not SCHEMA_PATH.is_file() or SCHEMA_PATH.read_text(encoding="utf-8") != text:
        SCHEMA_PATH.write_text(text, encoding="utf-8")
    return SCHEMA_PATH


def shipped_slots() -> int:
    """cog.yaml's concurrency.max: the prediction slots of the service as shipped."""
    from predict import cog_yaml_slots

    return int(cog_yaml_slots())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_session() -> requests.Session:
    """A requests session that never goes through a proxy (127.0.0.1 only)."""
    session = requests.Session()
    session.trust_env = False
    return session


class CogServer:
    """The ``runtime`` server (see the module docstring) on 127.0.0.1 in the repository root, serving
    ``model_dir``."""

    def __init__(self, model_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None,
                 runtime: str = "cog", slots: int | None = 1):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.runtime = runtime
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env.update({"PORT": str(self.port), "CHATGLM_WEIGHTS": str(model_dir), "PYTHONUNBUFFERED": "1"})
        env.pop("CHATGLM_FAMILY", None)
        # Prediction slots: ``slots``, or with None the shipped cog.yaml's (cog 0.16.12 and predict.py
        # read it; for coglet, `cog build` turns it into COG_MAX_CONCURRENCY, as done here).
        env.pop("COG_MAX_CONCURRENCY", None)
        if slots is None and runtime == "coglet":
            slots = shipped_slots()
        if slots is not None:
            env["COG_MAX_CONCURRENCY"] = str(slots)
        python = sys.executable
        if runtime == "coglet":
            write_schema()
            python = str(COGLET_PYTHON)
            # coglet starts its worker with the `python` on PATH: it must be the coglet environment's.
            env.update({"COG_PREDICT_TYPE_STUB": "predict.py:Predictor", "VIRTUAL_ENV": str(COGLET_VENV),
                        "PATH": f"{COGLET_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"})
        env.update(extra_env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([python, "-m", "cog.server.http", "--host", "127.0.0.1"],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.http = local_session()
        self.busy_retries = 0
        self.slots = slots if slots is not None else shipped_slots()
        self.slot_lag = runtime == "coglet" or self.slots > 1  # see submit()

    def error_message(self, body: dict[str, Any]) -> str:
        """The message of a failed prediction's exception, without coglet's wrapping."""
        error = body["error"]
        if self.runtime == "coglet":
            match = COGLET_FAILURE.match(error)
            assert match, f"coglet failure not in its documented form: {error!r}"
            return error[match.end():]
        return error

    def prediction_log(self, body: dict[str, Any]) -> str:
        """What the service printed during the prediction ``body``: its ``logs`` (cog 0.16.12), or the
        server log's lines for its id (coglet, whose response leaves out what a failed prediction
        printed and logs JSON lines)."""
        if self.runtime == "cog":
            return body.get("logs") or ""
        deadline = time.monotonic() + 5
        while True:
            lines = []
            for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue
                if fields.get("prediction_id") == body["id"] and fields.get("source") == "Stdout":
                    lines.append(fields.get("message", ""))
            if lines or time.monotonic() > deadline:
                return "\n".join(lines)
            time.sleep(0.1)

    @property
    def busy_answer(self) -> dict[str, Any]:
        """The body of this runtime's 409 (another prediction is running)."""
        return BUSY[self.runtime]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /health-check until READY; fail with the server log on exit, setup failure or timeout."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cog server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status = self.http.get(f"{self.url}/health-check", timeout=5).json().get("status")
            except (requests.ConnectionError, requests.Timeout, ValueError):
                status = None
            if status == "READY":
                return
            if status == "SETUP_FAILED":
                raise RuntimeError(f"cog server setup failed:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"cog server not READY after {timeout:.0f} s (last status {status}):\n{self.log_tail()}")

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no prediction is running (health-check READY rather than BUSY)."""
        self.wait_ready(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.http.close()
        self._log.close()

    def get(self, path: str) -> requests.Response:
        return self.http.get(f"{self.url}{path}", timeout=HTTP_TIMEOUT)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
        return self.http.post(f"{self.url}{path}", json=body, headers=headers, timeout=HTTP_TIMEOUT)

    def put(self, path: str, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
        return self.http.put(f"{self.url}{path}", json=body, headers=headers, timeout=HTTP_TIMEOUT)

    def submit(self, body: Any, headers: dict[str, str] | None = None, prediction_id: str | None = None
               ) -> requests.Response:
        """POST a prediction request (PUT to /predictions/<prediction_id> when given); returns the response.

        coglet frees its prediction slot a few milliseconds after it has answered, and so does cog
        0.16.12 with several slots after the final webhook of a cancelled prediction; a request
        sent right then may get its 409 (at capacity): that one is retried for up to
        SLOT_RELEASE_S (counted in ``busy_retries``)."""
        deadline = time.monotonic() + SLOT_RELEASE_S
        while True:
            response = (self.post("/predictions", body, headers=headers) if prediction_id is None
                        else self.put(f"/predictions/{prediction_id}", body, headers=headers))
            if response.status_code != 409 or not self.slot_lag or time.monotonic() > deadline:
                return response
            self.busy_retries += 1
            time.sleep(0.01)

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A synchronous prediction; returns the response JSON (HTTP 200 expected)."""
        response = self.submit({"input": inputs})
        assert response.status_code == 200, response.text
        return response.json()


class WebhookReceiver:
    """Collects the JSON bodies POSTed to ``url`` (in arrival order) on 127.0.0.1."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (stdlib name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._cond:
                    receiver.events.append(json.loads(body))
                    receiver._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
                """Quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="webhook-receiver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/webhook"

    def for_id(self, prediction_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("id") == prediction_id]

    def wait_for(self, prediction_id: str, predicate: Any, timeout: float) -> list[dict[str, Any]]:
        """Wait until ``predicate(events of prediction_id)`` is true; return those events."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                events = [e for e in self.events if e.get("id") == prediction_id]
                if predicate(events):
                    return events
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"webhooks for {prediction_id} after {timeout:.0f} s: "
                                       f"{[e.get('status') for e in events]}")
                self._cond.wait(min(left, 0.5))

    def wait_terminal(self, prediction_id: str, timeout: float = 60.0, settle: float = 0.5) -> list[dict[str, Any]]:
        """The events of ``prediction_id`` once its terminal event has come, and ``settle`` seconds
        more: coglet posts webhooks concurrently, so an output event may arrive after it."""
        self.wait_for(prediction_id, lambda ev: any(e.get("status") in TERMINAL for e in ev), timeout)
        time.sleep(settle)
        return self.for_id(prediction_id)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def final_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The terminal event (succeeded, failed or canceled) among a prediction's webhook events."""
    return next(e for e in events if e.get("status") in TERMINAL)
