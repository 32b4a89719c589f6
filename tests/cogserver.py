"""Runs the real Cog HTTP server (``python -m cog.server.http``) on 127.0.0.1 for tests, and a small
webhook receiver that collects what the server posts."""
from __future__ import annotations

import json
import os
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
    """``python -m cog.server.http --host 127.0.0.1`` in the repository root, serving ``model_dir``."""

    def __init__(self, model_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env.update({"PORT": str(self.port), "CHATGLM_WEIGHTS": str(model_dir), "PYTHONUNBUFFERED": "1"})
        env.pop("CHATGLM_FAMILY", None)
        env.update(extra_env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.http = local_session()

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

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A synchronous prediction; returns the response JSON (HTTP 200 expected)."""
        response = self.post("/predictions", {"input": inputs})
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

    def wait_terminal(self, prediction_id: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        return self.wait_for(prediction_id, lambda ev: any(e.get("status") in TERMINAL for e in ev), timeout)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
