"""The benchmark (``python -m chatglm.bench``) as a smoke test on a tiny shape; the figures it reports
for the real shape come from running it by hand (see the README)."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatglm.bench.randomckpt import bench_config, ensure_checkpoint
from chatglm.quant.kernels import native
from chatglm.weights.checkpoint import load_model
from chatglm.config import ChatGLMConfig

ROOT = Path(__file__).resolve().parent.parent


def test_random_checkpoint_is_official_int4_cached_and_finite(tmp_path):
    d = ensure_checkpoint(tmp_path, "tiny")
    weights = d / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_checkpoint(tmp_path, "tiny") == d and weights.stat().st_mtime_ns == mtime, "rebuilt, not reused"
    cfg = ChatGLMConfig.from_json(d / "config.json")
    assert cfg.quantization_bit == 4 and cfg.to_dict()["hidden_size"] == bench_config("tiny")["hidden_size"]
    model = load_model(d, cfg)  # strict: every official key present, none unexpected
    logits = model(torch.tensor([[5, 6, 7, 8]]))
    assert torch.isfinite(logits).all() and logits.std() > 0
    six_b = bench_config("6b")
    assert (six_b["num_layers"], six_b["hidden_size"], six_b["ffn_hidden_size"]) == (28, 4096, 13696)


def test_bench_runs_end_to_end_on_a_tiny_shape(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "chatglm.bench", "--shape", "tiny", "--cache-dir", str(tmp_path / "cache"),
           "--prompts", "8,40", "--decode-tokens", "4", "--baseline-tokens", "1", "--torch-int4-tokens", "2",
           "--batch-tokens", "2", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "decode, median of 4" in result.stdout and "targets:" in result.stdout
    r = json.loads(out.read_text())
    s = r["summary"]
    assert s["backend"] == ("cpu-native" if native.load() else "cpu-int4") and s["decode_tokens_timed"] == 4
    assert set(s["ttft_seconds"]) == {"8", "40"} and all(v > 0 for v in s["ttft_seconds"].values())
    for key in ("decode_ms_median", "floor_ms", "bandwidth_gb_per_s", "baseline_decode_ms_median", "setup_seconds",
                "read_seconds", "peak_rss_bytes", "matmul_gflops", "dequantize_floor_ms"):
        assert math.isfinite(s[key]) and s[key] > 0, key
    assert len(r["baseline"]["decode_step_seconds"]) == 1
    assert r["chatglm_cpp"]["status"]
    assert set(s["targets"]) >= {"decode_pct_of_floor", "decode_speedup_vs_baseline", "setup_over_read",
                                 "peak_rss_over_weight_bytes", "prefill_pct_of_matmul_rate", "decode_speedup_vs_torch_int4",
                                 "decode_m4_over_m1", "setup_over_read_warm", "prefill_speedup_vs_torch_int4"}
    assert set(s["batched_decode_ms"]) == {"1", "2", "4", "8"} and all(v > 0 for v in s["batched_decode_ms"].values())
    assert len(r["torch_int4"]["decode_step_seconds"]) == 2 and s["torch_int4_decode_ms_median"] > 0
    turns = r["torch_int4"]["interleaved_decode_seconds"]  # 2 tokens in 4 rounds: at least one per round
    assert {k: len(v) for k, v in turns.items()} == {"ours": 4, "torch-int4": 4}
    assert s["decode_speedup_vs_torch_int4"] == pytest.approx(
        statistics.median(turns["torch-int4"]) / statistics.median(turns["ours"]))
    assert "decode in turns, one process" in result.stdout
    assert s["streaming"]["int4"]["gb_per_s"] > 0 and s["streaming"]["output_layer"]["gb_per_s"] > 0
    assert s["streaming_m4"]["int4"]["gb_per_s"] > 0 and "int4 weights, M = 4" in result.stdout
    assert len(s["decode_pct_of_floor_by_reading"]) == len(r["bandwidth_bytes_per_s"]) == 3
    if native.load():
        assert s["paths"]["isa"] in native.supported_isas() and s["paths"]["prefill_path"] in ("bf16", "int8")
        assert "ISA path" in result.stdout and "decode step at M rows" in result.stdout


def test_bench_rejects_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "chatglm.bench", "--prompts", "8,x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--prompts must be comma-separated integers" in result.stderr


def test_bench_names_a_weights_directory_without_weights(tmp_path):
    result = subprocess.run([sys.executable, "-m", "chatglm.bench", "--weights", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--weights: no weights in" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_concurrency_writes_the_documented_keys(tmp_path):
    out = tmp_path / "c.json"
    cmd = [sys.executable, "-m", "chatglm.bench", "--shape", "tiny", "--cache-dir", str(tmp_path / "cache"),
           "--concurrency", "1,2", "--concurrency-tokens", "4", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    levels = json.loads(out.read_text())["summary"]["concurrency"]
    assert set(levels) == {"1", "2"}
    for figures in levels.values():
        assert {"aggregate_tokens_per_s", "per_stream_tokens_per_s", "ttft_p50_s", "ttft_p99_s"} <= set(figures)
        assert figures["aggregate_tokens_per_s"] > 0 and figures["ttft_p99_s"] >= figures["ttft_p50_s"] > 0


def test_thread_pool_bench_times_every_arrangement_on_a_tiny_shape(tmp_path):
    from chatglm.bench import threads
    from chatglm.bench.measure import ModelRun
    model = ModelRun(ensure_checkpoint(tmp_path, "tiny"), torch.device("cpu"), torch.float32, "auto").model
    result = threads.measure(model, rounds=2)
    assert set(result) == {"loading thread", "other thread, pool alive", "other thread, pool released"}
    assert all(math.isfinite(s) and s > 0 for s in result.values())
    cmd = [sys.executable, "-m", "chatglm.bench.threads", "--shape", "tiny", "--cache-dir", str(tmp_path), "--rounds", "1"]
    shown = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "other thread, pool released" in shown.stdout and "1.00x released" in shown.stdout


def test_batched_steps_come_in_interleaved_rounds(tmp_path, monkeypatch):
    from chatglm.bench import kernels
    from chatglm.bench.measure import ModelRun
    model = ModelRun(ensure_checkpoint(tmp_path, "tiny"), torch.device("cpu"), torch.float32, "auto").model
    calls = []
    real = kernels.batched_decode_seconds

    def spy(model, rows, steps, *args, **kwargs):
        calls.append(rows)
        return real(model, rows, steps, *args, **kwargs)

    monkeypatch.setattr(kernels, "batched_decode_seconds", spy)
    got = kernels.batched_decode_rounds(model, (1, 4), steps=5, rounds=3)
    assert calls == [1, 4, 1, 4, 1, 4]
    assert {m: len(v) for m, v in got.items()} == {"1": 6, "4": 6}  # ceil(5 / 3) = 2 per round, warm-up dropped
    assert all(math.isfinite(t) and t > 0 for v in got.values() for t in v)
