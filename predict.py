"""Cog predictor: inputs in, streamed text out. All model work lives in the chatglm package.

Every ``Input(...)`` argument is a literal (numbers as numbers, each description one plain string):
today's ``cog build`` reads this file as text to write the input schema that its runtime validates
against, and drops anything else (tests/test_static_schema.py keeps it so). No ``from __future__
import annotations``: cog 0.16 reads the annotations as objects, not strings.
"""
import os
import time
from typing import Any, Optional

from cog import BasePredictor, ConcatenateIterator, Input, current_scope

from chatglm import GenerationStats, Pipeline
from chatglm.serving.inputs import build_request, check_min_tokens, integer_input, number_input
from chatglm.serving.openmp import release_thread_pool

try:
    from cog import CancelationException  # cog >= 0.17 (coglet)
except ImportError:
    from cog.server.exceptions import CancelationException  # cog 0.16

DEFAULT_WEIGHTS = "weights"


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
        release_thread_pool()  # predictions may run on other threads (coglet: a new one each time)

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
        prompt, system_prompt, messages, tools, stop_sequences = (
            _given(v) for v in (prompt, system_prompt, messages, tools, stop_sequences))
        max_tokens, temperature, top_p, top_k, repetition_penalty, seed = (
            _given(v) for v in (max_tokens, temperature, top_p, top_k, repetition_penalty, seed))
        presence_penalty, frequency_penalty, min_tokens = (
            _given(v) for v in (presence_penalty, frequency_penalty, min_tokens))
        stats = GenerationStats()
        outcome = "cancelled"
        chunks = None
        try:
            max_tokens, top_k, seed, min_tokens = (integer_input(name, value) for name, value in (
                ("max_tokens", max_tokens), ("top_k", top_k), ("seed", seed), ("min_tokens", min_tokens)))
            check_min_tokens(min_tokens, max_tokens)
            temperature, top_p, repetition_penalty = (number_input(name, value) for name, value in (
                ("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)))
            request = build_request(self.pipe, prompt, system_prompt, messages, tools, stop_sequences)
            for warning in request.warnings:
                print(f"warning: {warning}")
            chunks = self.pipe.stream(request.messages, max_new_tokens=max_tokens, temperature=temperature,
                                      top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                                      seed=seed, stop_sequences=request.stop_sequences, stats=stats,
                                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                      min_tokens=min_tokens)
            for chunk in chunks:
                yield chunk
            outcome = stats.stop_reason
        except CancelationException:
            raise
        except Exception as exc:
            outcome = f"failed ({type(exc).__name__}: {exc})"
            raise
        finally:
            # A cancelled or failed prediction ends here; closing the stream now stops generation and
            # frees the KV cache at once instead of whenever the abandoned generator is collected.
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            print(f"seed: {stats.seed}; {stats.input_tokens} input tokens, {stats.output_tokens} output "
                  f"tokens, stop: {outcome}")
            _record_metrics(stats)
            # One live OpenMP pool at a time: the next prediction may come on another thread.
            release_thread_pool()


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
