"""Releasing a thread's OpenMP pool: its worker threads exit (torch's libgomp, where torch runs on it),
parallel ops still give the same results afterwards, it changes nothing where libgomp is missing,
and the engine releases the pool of the thread that starts it."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from chatglm.config import ChatGLMConfig
from chatglm.serving import openmp, scheduler
from chatglm.weights.checkpoint import load_model
from tests.tiny import random_state, tiny_config, write_model

TASKS = Path("/proc/self/task")


def _tasks_after(predicate, timeout: float = 2.0) -> int:
    """The process's thread count once ``predicate(count)`` holds (or at the timeout)."""
    deadline = time.monotonic() + timeout
    count = len(list(TASKS.iterdir()))
    while not predicate(count) and time.monotonic() < deadline:
        time.sleep(0.01)
        count = len(list(TASKS.iterdir()))
    return count


def test_release_frees_the_pool_and_parallel_ops_still_agree() -> None:
    if openmp.torch_libgomp() is None:
        pytest.skip("torch does not run on libgomp here (another parallel backend)")
    x = torch.arange(1 << 22, dtype=torch.float64)
    want = x.sum()  # a parallel op: this thread's pool exists from here on
    if TASKS.is_dir() and torch.get_num_threads() > 1:
        with_pool = len(list(TASKS.iterdir()))
        assert openmp.release_thread_pool()
        assert _tasks_after(lambda n: n < with_pool) < with_pool, "no worker thread left"
    else:
        assert openmp.release_thread_pool()
    assert torch.equal(x.sum(), want)  # the pool comes back for the next parallel op


def test_without_libgomp_nothing_is_released(monkeypatch) -> None:
    monkeypatch.setattr(openmp, "torch_libgomp", lambda: None)
    assert openmp.release_thread_pool() is False


def test_the_engine_releases_the_pool_of_the_thread_that_starts_it(tmp_path, monkeypatch) -> None:
    cfg = tiny_config(seq_length=32)
    d = write_model(tmp_path, cfg, random_state(cfg, seed=3), "safetensors")
    model = load_model(d, ChatGLMConfig.from_json(d / "config.json"))
    callers = []
    monkeypatch.setattr(scheduler, "release_thread_pool", lambda: callers.append(threading.current_thread()))
    engine = scheduler.Scheduler(model, max_batch=1)
    try:
        assert callers == [threading.current_thread()]
    finally:
        engine.close()
