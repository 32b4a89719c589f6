"""Measurement primitives for the benchmark: file read time, memory bandwidth, matmul rate, RSS,
and one model's setup / time to first token / decode step times."""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..weights.checkpoint import find_weight_files
from ..config import ChatGLMConfig
from ..model.decoder import DecoderPool
from ..serving.generation import generate_ids
from ..serving.loading import load_for_inference
from ..quant.linear import Int4Linear
from ..serving.sampling import SamplingParams

READ_BLOCK = 64 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux: VmHWM, which unlike ``ru_maxrss`` does
    not inherit the high-water mark of the process that started this one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def read_files_seconds(model_dir: str | Path) -> tuple[float, int]:
    """Time to read every weight file of ``model_dir`` once, sequentially, and the bytes read."""
    files = find_weight_files(model_dir)
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for path in files.files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - t0, total


def drop_page_cache(model_dir: str | Path) -> bool:
    """Ask the OS to evict the weight files from its page cache (no privileges needed), so the next
    read comes from the disk as after a restart. False where the OS offers no way to do so."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in find_weight_files(model_dir).files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 7) -> float:
    """Memory read bandwidth in bytes/s: the median time to sum a ``gib`` GiB float32 tensor."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32, device=device)
    seconds = median_seconds(lambda: x.sum(), repeats, device, warmup=2)
    return x.numel() * 4 / seconds


def matmul_rate(dtype: torch.dtype, device: torch.device, m: int = 512, k: int = 4096, n: int = 4096,
                repeats: int = 3) -> float:
    """FLOP/s of ``F.linear`` on ``[m, k] x [n, k]^T`` in ``dtype`` (median)."""
    a = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    return 2 * m * k * n / median_seconds(lambda: F.linear(a, w), repeats, device)


def decode_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every weight except the embedding table (one row of it).
    Backends keep their packed tensors as buffers, so they are counted here too."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "word_embeddings" not in name and t is not None:
            total += t.numel() * t.element_size()
    return total


def int4_weight_count(model: torch.nn.Module) -> int:
    """How many weights the int4 layers hold."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))


def prefill_flops_per_token(model: torch.nn.Module) -> int:
    """2 x the weights a prompt token is multiplied with (every weight but the embedding table)."""
    cfg: ChatGLMConfig = model.config
    per_layer = (cfg.qkv_out_features * cfg.hidden_size + cfg.hidden_size * cfg.num_attention_heads * cfg.kv_channels
                 + 2 * cfg.ffn_hidden_size * cfg.hidden_size + cfg.hidden_size * cfg.ffn_hidden_size)
    return 2 * (cfg.num_layers * per_layer + cfg.padded_vocab_size * cfg.hidden_size)


class ModelRun:
    """One loaded model and its timings (setup, time to first token, decode steps)."""

    def __init__(self, model_dir: str | Path, device: torch.device, dtype: torch.dtype, backend: str):
        self.device = device
        self.config = ChatGLMConfig.from_json(Path(model_dir) / "config.json")
        t0 = time.perf_counter()
        self.model, self.backend = load_for_inference(model_dir, self.config, device, dtype, backend=backend)
        sync(device)
        self.setup_seconds = time.perf_counter() - t0
        self.rss_after_setup = peak_rss_bytes()
        self.gen = torch.Generator().manual_seed(0)
        self.decoders = DecoderPool(self.model)

    def prompt(self, n: int) -> list[int]:
        vocab = min(self.config.padded_vocab_size, 64000)
        return torch.randint(100, vocab, (n,), generator=self.gen).tolist()

    def _steps(self, ids: list[int], new_tokens: int, params: SamplingParams) -> list[float]:
        """Seconds from the call to the first token, then between successive tokens."""
        out = []
        t0 = time.perf_counter()
        gen = generate_ids(self.model, ids, new_tokens, params, stop_ids=(), max_context=self.config.seq_length,
                           generator=torch.Generator(device=self.device).manual_seed(1),
                           vocab_limit=self.config.padded_vocab_size, decoders=self.decoders)
        for _ in gen:
            now = time.perf_counter()
            out.append(now - t0)
            t0 = now
        return out

    def time_to_first_token(self, prompt_tokens: int, repeats: int) -> float:
        ids = self.prompt(prompt_tokens)
        return statistics.median(self._steps(ids, 1, SamplingParams())[0] for _ in range(repeats))

    def decode_step_seconds(self, tokens: int, prompt_tokens: int = 32) -> list[float]:
        """Per-token decode times (the first token, which includes the prefill, excluded), sampling
        with the service's defaults (temperature 0.8, top_p 0.8, top_k 50)."""
        params = SamplingParams(temperature=0.8, top_p=0.8, top_k=50)
        return self._steps(self.prompt(prompt_tokens), tokens + 1, params)[1:]


TURN_ROUNDS = 4
"""Rounds of :func:`in_turns`."""


def in_turns(timers: dict[str, Callable[[int], list[float]]], steps: int,
             rounds: int = TURN_ROUNDS) -> dict[str, list[float]]:
    """``steps`` step times (at least one per round) of each timer, called with a step count in
    ``rounds`` alternating rounds, so that the machine's drift (its bandwidth moves by a third within
    minutes) lands on every timer alike."""
    per_round = max(1, -(-steps // rounds))
    out: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            out[name] += timer(per_round)
    return out


def interleaved_decode(runs: dict[str, "ModelRun"], tokens: int) -> dict[str, list[float]]:
    """Decode step seconds of each loaded model, ``tokens`` of them, taken in turns (:func:`in_turns`)."""
    return in_turns({name: run.decode_step_seconds for name, run in runs.items()}, tokens)
