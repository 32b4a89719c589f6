"""Decode steps from another thread than the one that loaded the model, with that thread's OpenMP
pool alive and released (:mod:`chatglm.serving.openmp`), interleaved in one process.

This is how the service runs: coglet calls ``setup()`` on the main thread and each ``predict()`` on a
new one, and the engine of ``Pipeline.serve`` is a thread of its own. Usage:
``python -m chatglm.bench.threads [--weights DIR | --shape 6b|tiny] [--rounds 8]``.
"""
from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

import torch

from ..model.cache import KVCache
from ..serving.openmp import release_thread_pool
from .measure import ModelRun
from .randomckpt import DEFAULT_CACHE, SHAPES, ensure_checkpoint

STEPS = 4
"""Decode steps per turn; the first of each turn is not counted (the pool may have just been made)."""


class _Decoder:
    """Greedy one-row decode steps over one cache, from whichever thread calls :meth:`steps`."""

    def __init__(self, model: torch.nn.Module, capacity: int):
        self.model, self.pos = model, 8
        self.cache = KVCache(model.config, 1, capacity, model.device, model.dtype)
        with torch.inference_mode():
            self.next = self._argmax(model(torch.arange(100, 108)[None], torch.arange(8)[None], self.cache,
                                           last_only=True))

    @staticmethod
    def _argmax(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].argmax(-1, keepdim=True)

    def steps(self, n: int) -> list[float]:
        times = []
        with torch.inference_mode():
            for _ in range(n):
                t0 = time.perf_counter()
                logits = self.model(self.next, torch.full((1, 1), self.pos), self.cache, last_only=True,
                                    span=self.pos + 1)
                self.next = self._argmax(logits)
                times.append(time.perf_counter() - t0)
                self.pos += 1
        return times


def measure(model: torch.nn.Module, rounds: int) -> dict[str, float]:
    """Median step seconds: in the loading thread, and in a second thread while the loading thread's
    pool is alive and after it is released, the three taken in turn ``rounds`` times."""
    decoder = _Decoder(model, 8 + rounds * 3 * STEPS + 1)
    jobs: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def worker() -> None:
        while (n := jobs.get()) is not None:
            done.put(decoder.steps(n))

    other = threading.Thread(target=worker, daemon=True)
    other.start()
    times: dict[str, list[float]] = {"loading thread": [], "other thread, pool alive": [],
                                     "other thread, pool released": []}
    try:
        for _ in range(rounds):
            times["loading thread"] += decoder.steps(STEPS)[1:]  # (re)creates this thread's pool
            jobs.put(STEPS)
            times["other thread, pool alive"] += done.get()[1:]
            release_thread_pool()
            jobs.put(STEPS)
            times["other thread, pool released"] += done.get()[1:]
    finally:
        jobs.put(None)
        other.join()
        decoder.cache.release()
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m chatglm.bench.threads", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="a real int4 model directory (default: a cached random checkpoint)")
    ap.add_argument("--shape", default="6b", choices=sorted(SHAPES), help="random checkpoint shape (default 6b)")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"where random checkpoints live ({DEFAULT_CACHE})")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    model_dir = args.weights or ensure_checkpoint(args.cache_dir, args.shape)
    model = ModelRun(model_dir, torch.device("cpu"), torch.bfloat16, "auto").model
    result = measure(model, args.rounds)
    base = result["other thread, pool released"]
    print(f"one-row decode step, {torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds:")
    for name, seconds in result.items():
        print(f"  {name:30s} {seconds * 1e3:8.1f} ms ({seconds / base:.2f}x released)")


if __name__ == "__main__":
    main()
