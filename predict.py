"""Cog predictor: inputs in, streamed text out. All model work lives in the chatglm package.

Every ``Input(...)`` argument is a literal (numbers as numbers, each description one plain string):
today's ``cog build`` reads this file as text to write the input schema that its runtime validates
against, and drops anything else (tests/test_static_schema.py keeps it so). No ``from __future__
import annotations``: cog 0.16 reads the annotations as objects, not strings.

Concurrent predictions: the number of slots is COG_MAX_CONCURRENCY where set (both runtimes read it;
``cog build`` sets it from cog.yaml), else cog.yaml's ``concurrency.max``. With one slot ``predict``
is a plain generator, which both runtimes cancel at once. With more, the model is served by the
engine thread (requests batched at step boundaries) and ``predict`` is async, in the one form each
runtime streams: coglet 0.23.1 collects an async generator's chunks until it ends but streams a
generator that a coroutine returns; cog 0.16.12 streams an async generator but runs a returned
generator on its event loop, one prediction at a time (README, "Concurrent predictions").
"""
import asyncio
import contextvars
import functools
import importlib.util
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import cog
import yaml
from cog import BasePredictor, ConcatenateIterator, Input, current_scope

from chatglm import GenerationStats, Pipeline
from chatglm.serving.inputs import build_request, check_min_tokens, integer_input, number_input
from chatglm.serving.openmp import release_thread_pool
from chatglm.serving.scheduler import engine_batch

try:
    from cog import CancelationException  # cog >= 0.17 (coglet)
except ImportError:
    from cog.server.exceptions import CancelationException  # cog 0.16

DEFAULT_WEIGHTS = "weights"
COG_CONFIG = Path(__file__).with_name("cog.yaml")
COGLET = importlib.util.find_spec("coglet") is not None  # cog 0.16.12 itself hands over to coglet when importable


def cog_yaml_slots() -> Any:
    """cog.yaml's concurrency.max as written (1 where cog.yaml or the key is absent)."""
    config = yaml.safe_load(COG_CONFIG.read_text(encoding="utf-8")) if COG_CONFIG.is_file() else None
    return ((config or {}).get("concurrency") or {}).get("max", 1)


def max_concurrency() -> int:
    """The prediction slots: $COG_MAX_CONCURRENCY, else cog.yaml's concurrency.max, else 1."""
    raw: Any = os.environ.get("COG_MAX_CONCURRENCY")
    where = "COG_MAX_CONCURRENCY"
    if not raw:
        raw, where = cog_yaml_slots(), f"{COG_CONFIG.name}: concurrency.max"
    try:
        slots = int(raw)
    except (TypeError, ValueError):
        slots = 0
    if slots < 1 or str(slots) != str(raw).strip():
        raise ValueError(f"{where} must be a whole number >= 1, got {raw!r}")
    return slots


MAX_CONCURRENCY = max_concurrency()


def _served(slots: int) -> Callable[[Callable[..., Iterator[str]]], Callable[..., Any]]:
    """``predict`` in the form the running Cog runtime streams and runs ``slots`` at a time (see the
    module docstring); the signature and annotations stay the generator's (``functools.wraps``)."""
    def wrap(start: Callable[..., "_Prediction"]) -> Callable[..., Any]:
        if slots == 1:
            @functools.wraps(start)
            def predict(self: "Predictor", **inputs: Any) -> Iterator[str]:
                prediction = start(self, **inputs)
                try:
                    yield from prediction
                finally:  # also where a cancel, raised in whatever frame is running, ends up
                    prediction.close()
            return predict
        if COGLET:
            @functools.wraps(start)
            async def predict(self: "Predictor", **inputs: Any) -> Iterator[str]:
                # coglet iterates the returned generator on the prediction's own thread, outside the
                # context this coroutine runs in (the one that routes print() to the prediction).
                return _in_context(contextvars.copy_context(), start(self, **inputs))
        else:
            @functools.wraps(start)
            async def predict(self: "Predictor", **inputs: Any) -> AsyncIterator[str]:
                async for chunk in _from_thread(start(self, **inputs), self.readers):
                    yield chunk
        concurrent = getattr(cog, "concurrent", None)  # cog >= 0.21
        return concurrent(max=slots)(predict) if concurrent is not None else predict
    return wrap


def _in_context(context: contextvars.Context, prediction: "_Prediction") -> Iterator[str]:
    """The chunks of ``prediction``, each step run in ``context``."""
    done = object()
    try:
        while (chunk := context.run(next, prediction, done)) is not done:
            yield chunk
    finally:
        context.run(prediction.close)


async def _from_thread(prediction: "_Prediction", readers: ThreadPoolExecutor) -> AsyncIterator[str]:
    """The chunks of ``prediction``, each step run on a thread of ``readers`` so that the event loop
    serves the other predictions meanwhile. A cancel (asyncio's, at the ``await``) cancels the
    generation; the step in flight then ends within a decode step."""
    loop = asyncio.get_running_loop()
    done = object()
    step: Optional[asyncio.Future] = None
    try:
        while True:
            step = asyncio.ensure_future(loop.run_in_executor(readers, contextvars.copy_context().run, next,
                                                              prediction, done))
            chunk = await asyncio.shield(step)
            if chunk is done:
                return
            yield chunk
    except asyncio.CancelledError:
        prediction.cancel()
        raise
    finally:
        if step is not None and not step.done():
            await asyncio.wait([step])
        await loop.run_in_executor(readers, contextvars.copy_context().run, prediction.close)


class _Prediction:
    """One prediction's text chunks (an iterator). The first ``next()`` checks the inputs and starts
    the generation, so a bad input fails as the prediction's error; ``cancel()`` may come from any
    thread; ``close()`` (from the reading side, when it is over) ends it, logs its line and records its metrics."""

    def __init__(self, pipe: Pipeline, inputs: dict[str, Any]):
        self.pipe, self.inputs = pipe, {name: _given(value) for name, value in inputs.items()}
        self.stats = GenerationStats()
        self.outcome = "cancelled"
        self.chunks: Any = None
        self.cancelled = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            if self.chunks is None:
                self.chunks = self._start(**self.inputs)
                if self.cancelled:  # cancel() came while the generation was being started
                    self.cancel()
            return next(self.chunks)
        except StopIteration:
            self.outcome = self.stats.stop_reason or "cancelled"
            raise
        except CancelationException:
            raise
        except Exception as exc:
            self.outcome = f"failed ({type(exc).__name__}: {exc})"
            raise

    def _start(self, prompt: str, system_prompt: str, messages: str, tools: str, max_tokens: int,
               temperature: float, top_p: float, top_k: int, repetition_penalty: float, presence_penalty: float,
               frequency_penalty: float, min_tokens: int, stop_sequences: str, seed: Optional[int]) -> Iterator[str]:
        max_tokens, top_k, seed, min_tokens = (integer_input(name, value) for name, value in (
            ("max_tokens", max_tokens), ("top_k", top_k), ("seed", seed), ("min_tokens", min_tokens)))
        check_min_tokens(min_tokens, max_tokens)
        temperature, top_p, repetition_penalty = (number_input(name, value) for name, value in (
            ("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)))
        request = build_request(self.pipe, prompt, system_prompt, messages, tools, stop_sequences)
        for warning in request.warnings:
            print(f"warning: {warning}")
        return self.pipe.stream(request.messages, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                                stop_sequences=request.stop_sequences, stats=self.stats,
                                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                min_tokens=min_tokens)

    def cancel(self) -> None:
        self.cancelled = True
        cancel = getattr(self.chunks, "cancel", None)
        if cancel is not None:
            cancel()

    def close(self) -> None:
        # Closing the stream now stops generation and frees the KV cache at once instead of whenever
        # the abandoned generator is collected.
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()
        stats = self.stats
        print(f"seed: {stats.seed}; {stats.input_tokens} input tokens, {stats.output_tokens} output "
              f"tokens, stop: {self.outcome}")
        _record_metrics(stats)
        if self.pipe.scheduler is None:
            # One live OpenMP pool at a time: the next prediction may come on another thread.
            release_thread_pool()


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the int4 model from $CHATGLM_WEIGHTS (default weights/) onto CUDA when present, else CPU."""
        weights = os.environ.get("CHATGLM_WEIGHTS") or DEFAULT_WEIGHTS
        if not os.path.isdir(weights):
            raise FileNotFoundError(f"model directory {os.path.abspath(weights)} (CHATGLM_WEIGHTS={weights!r}) "
                                    "does not exist; fill it with `python -m chatglm.download <repo>` "
                                    "(see the README)")
        started = time.perf_counter()
        self.pipe = Pipeline.from_pretrained(weights, device="auto", quantize=4,
                                             family=os.environ.get("CHATGLM_FAMILY") or None)
        warm = self.pipe.warmup()
        print(f"setup: {self.pipe.family} from {weights} in {time.perf_counter() - started:.1f} s "
              f"(warm-up {warm:.1f} s)")
        if MAX_CONCURRENCY > 1:
            if not COGLET:
                # One reader thread per slot (cog 0.16.12's form): a step blocks until the engine gives
                # its prediction a token, so with fewer threads than slots (asyncio's default pool has 6
                # on 2 cores) the predictions being decoded could wait behind ones it cannot take yet.
                self.readers = ThreadPoolExecutor(max_workers=MAX_CONCURRENCY, thread_name_prefix="prediction")
            batch = engine_batch(self.pipe.model.device, MAX_CONCURRENCY)
            self.pipe.serve(max_batch=batch, max_waiting=MAX_CONCURRENCY - batch)
            print(f"setup: {MAX_CONCURRENCY} concurrent predictions, decoded {batch} at a time")
        release_thread_pool()  # predictions may run on other threads (coglet: a new one each time)

    @_served(MAX_CONCURRENCY)
    def predict(
        self,
        prompt: str = Input(
            description="A user message, or a complete raw prompt in the model's own format, used as-is: ChatGLM2 rounds starting with [Round 1], or ChatGLM3 role markers such as <|user|>.",
            default=""),
        system_prompt: str = Input(
            description="System message (ChatGLM3). ChatGLM2 has no system role: the text is put before the first user message.",
            default=""),
        messages: str = Input(
            description="A whole conversation as a JSON list of objects with role (system, user, assistant or observation), content and optional metadata; replaces prompt.",
            default=""),
        tools: str = Input(
            description='JSON list of tool definitions (ChatGLM3). A tool call comes back as one JSON chunk {"tool_call": {"name": ..., "arguments": {...}}}.',
            default=""),
        max_tokens: int = Input(description="Maximum number of new tokens.", default=2048, ge=1, le=32768),
        temperature: float = Input(description="Sampling temperature; 0 (or below 1e-5) means greedy.",
                                   default=0.8, ge=0.0, le=2.0),
        top_p: float = Input(
            description="Nucleus sampling: keep the most likely tokens up to this probability mass.",
            default=0.8, ge=0.0, le=1.0),
        top_k: int = Input(description="Keep only the k most likely tokens; 0 turns it off.",
                           default=50, ge=0, le=65024),
        repetition_penalty: float = Input(description="Penalty for tokens already present; 1 turns it off.",
                                          default=1.0, ge=0.01, le=10.0),
        presence_penalty: float = Input(
            description="Subtracted once from the logits of every token already generated (OpenAI semantics); 0 turns it off.",
            default=0.0, ge=0.0, le=2.0),
        frequency_penalty: float = Input(
            description="Subtracted from the logits of every generated token once per time it was generated (OpenAI semantics); 0 turns it off.",
            default=0.0, ge=0.0, le=2.0),
        min_tokens: int = Input(
            description="The answer does not end before this many new tokens (the end-of-answer tokens are masked until then); at most max_tokens.",
            default=0, ge=0, le=32768),
        stop_sequences: str = Input(
            description="Comma-separated texts that end the answer (not included), or a JSON list of strings for texts with commas; at most 32, each at most 500 characters.",
            default=""),
        seed: Optional[int] = Input(
            description="Random seed; the same seed and inputs give the same output. Random when empty (the seed used is logged).",
            default=None, ge=0, le=4294967295),
    ) -> ConcatenateIterator[str]:
        return _Prediction(self.pipe, dict(
            prompt=prompt, system_prompt=system_prompt, messages=messages, tools=tools, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, min_tokens=min_tokens,
            stop_sequences=stop_sequences, seed=seed))


def _given(value: Any) -> Any:
    """The value of an input, or its default when it arrives as its ``Input(...)`` object: cog 0.16
    calls predict() without arguments for a request with no "input" (or ``"input": null``)."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return getattr(value, "default", value)


def _record_metrics(stats: GenerationStats) -> None:
    """Token counts and speed as Cog metrics; skipped when predict() runs outside a Cog prediction
    (cog 0.16's current_scope() raises RuntimeError there, e.g. when a test calls predict())."""
    try:
        scope = current_scope()
    except RuntimeError:
        return
    scope.record_metric("input_token_count", stats.input_tokens)
    scope.record_metric("output_token_count", stats.output_tokens)
    if stats.time_to_first_token is not None:
        scope.record_metric("time_to_first_token", stats.time_to_first_token)
    scope.record_metric("tokens_per_second", stats.tokens_per_second)
