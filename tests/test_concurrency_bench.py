"""How the concurrency benchmark counts: decode tokens/s over the window where every stream decodes,
by the engine's step times (the step that ends the window counts for all its rows), TTFT by the
readers; levels interleaved over rounds, each figure the median of its rounds."""
from __future__ import annotations

import pytest

from chatglm.bench import concurrency


def _two_streams(*_args, **_kwargs):
    """Stream 1 is prefilled at t=1 and decodes at 1.5; stream 2 is prefilled at 2 and both decode
    at 2.5 and 3 (stream 1 then has its 4 tokens) and stream 2 alone at 3.5. Readers wake a little
    after the engine, stream 2's reader later than stream 1's."""
    engine = [[1.0, 1.5, 2.5, 3.0], [2.0, 2.5, 3.0, 3.5]]
    readers = [[t + 0.001 for t in engine[0]], [t + 0.002 for t in engine[1]]]
    return 0.0, readers, engine, 0.9


def test_the_window_counts_every_row_of_its_last_step(monkeypatch):
    monkeypatch.setattr(concurrency, "_run_streams", _two_streams)
    r = concurrency.run_level(None, 2, 8, 4)
    assert r["window_seconds"] == pytest.approx(1.0)  # from stream 2's first token to stream 1's last
    assert r["window_tokens"] == 4  # the steps at 2.5 and 3.0, both rows of each
    assert r["aggregate_tokens_per_s"] == pytest.approx(4.0) and r["per_stream_tokens_per_s"] == pytest.approx(2.0)
    assert r["ttft_p50_s"] == pytest.approx(1.001) and r["ttft_p99_s"] == pytest.approx(2.002)
    assert r["cores_used"] >= 0


def test_cores_used_is_cpu_seconds_per_wall_second(monkeypatch):
    clock = {"cpu": 10.0, "wall": 100.0}

    def streams(*_args, **_kwargs):
        clock["cpu"] += 3.0  # the level kept 1.5 cores busy for 2 s
        clock["wall"] += 2.0
        return _two_streams()

    monkeypatch.setattr(concurrency, "_run_streams", streams)
    monkeypatch.setattr(concurrency.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(concurrency.time, "perf_counter", lambda: clock["wall"])
    assert concurrency.run_level(None, 2, 8, 4)["cores_used"] == pytest.approx(1.5)


def test_streams_that_never_decode_together_are_an_error(monkeypatch):
    monkeypatch.setattr(concurrency, "_run_streams",
                        lambda *a, **k: (0.0, [[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]], 0.0))
    with pytest.raises(RuntimeError, match="never decoded together"):
        concurrency.run_level(None, 2, 8, 2)


def test_levels_run_in_interleaved_rounds_and_report_medians(monkeypatch):
    order = []

    def level(_model, n, _prompt, _new, seed=0):
        order.append((n, seed))
        rate = {0: 10.0, 1: 30.0, 2: 20.0}[seed] * n
        return {"aggregate_tokens_per_s": rate, "per_stream_tokens_per_s": rate / n, "window_seconds": 1.0,
                "window_tokens": int(rate), "ttft_p50_s": 0.5, "ttft_p99_s": 0.7, "longest_stall_s": 0.1,
                "cores_used": 1.9,
                "streams": n, "new_tokens": 4, "prompt_tokens": 8}

    monkeypatch.setattr(concurrency, "_run_streams", lambda *a, **k: None)  # the warm-ups
    monkeypatch.setattr(concurrency, "run_level", level)
    out = concurrency.run_levels(None, [1, 4], rounds=3)
    assert order == [(1, 0), (4, 0), (1, 1), (4, 1), (1, 2), (4, 2)]
    assert out["4"]["aggregate_tokens_per_s"] == 80.0 and out["1"]["per_stream_tokens_per_s"] == 20.0
    assert [r["aggregate_tokens_per_s"] for r in out["4"]["rounds"]] == [40.0, 120.0, 80.0]
    assert out["4"]["streams"] == 4 and "1.00x / 1.00x" in concurrency.table(out)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        concurrency.run_levels(None, [1], rounds=0)
