"""Webhooks that never answer, on coglet 0.23.1 (the runtime `cog build` ships): a closed port, a
receiver that accepts and never answers, and the server's own /shutdown. The next prediction is
served within a bounded time (the /shutdown one stops the server at once instead of deadlocking).
cog 0.16.12 stays busy or hangs on each of these (see the README's "Errors and limits")."""
from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.cogserver import CogServer, free_port, skip_without_coglet

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")

NEXT_PREDICTION_WITHIN_S = 10.0
INPUTS = {"prompt": "你好", "temperature": 0, "max_tokens": 4}


@pytest.fixture
def server(chatglm2_dir: Path, tmp_path: Path) -> Iterator[CogServer]:
    skip_without_coglet()
    srv = CogServer(chatglm2_dir, tmp_path / "server.log", runtime="coglet")
    try:
        srv.wait_ready(timeout=120)
        yield srv
    finally:
        srv.stop()


class SilentReceiver:
    """Accepts connections on 127.0.0.1 and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/webhook"

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def _async_with_webhook(server: CogServer, url: str) -> None:
    response = server.submit({"input": INPUTS, "webhook": url}, headers={"Prefer": "respond-async"},
                             prediction_id=f"hook-{uuid.uuid4().hex[:10]}")
    assert response.status_code == 202, response.text


def _next_prediction_seconds(server: CogServer) -> float:
    started = time.monotonic()
    while time.monotonic() - started < NEXT_PREDICTION_WITHIN_S:
        try:
            response = server.http.post(f"{server.url}/predictions", json={"input": INPUTS}, timeout=5)
        except OSError:
            response = None
        if response is not None and response.status_code == 200:
            assert response.json()["status"] == "succeeded", response.text
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"no prediction served within {NEXT_PREDICTION_WITHIN_S} s:\n{server.log_tail()}")


def test_webhook_to_a_closed_port(server: CogServer) -> None:
    _async_with_webhook(server, f"http://127.0.0.1:{free_port()}/webhook")
    seconds = _next_prediction_seconds(server)
    print(f"\nclosed-port webhook: next prediction served after {seconds:.2f} s")


def test_webhook_that_never_answers(server: CogServer) -> None:
    receiver = SilentReceiver()
    try:
        _async_with_webhook(server, receiver.url)
        seconds = _next_prediction_seconds(server)
        assert server.get("/health-check").json()["status"] in ("READY", "BUSY")
    finally:
        receiver.close()
    print(f"\nsilent webhook: next prediction served after {seconds:.2f} s "
          f"({len(receiver.accepted)} connections left unanswered)")


def test_webhook_to_the_servers_own_shutdown(server: CogServer) -> None:
    """coglet runs the shutdown the webhook asks for: the server exits at once (status 0), with no
    deadlock; a supervisor (Replicate's, or Docker's restart policy) starts it again."""
    started = time.monotonic()
    _async_with_webhook(server, f"{server.url}/shutdown")
    server.proc.wait(timeout=NEXT_PREDICTION_WITHIN_S)
    print(f"\n/shutdown webhook: server exited with {server.proc.returncode} after "
          f"{time.monotonic() - started:.2f} s")
    assert server.proc.returncode == 0
