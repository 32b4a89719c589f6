"""The public entry point: tokenizer + prompt format + model + generation behind one object."""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

import prompts

from .loading import load_for_inference
from ..config import ChatGLMConfig
from ..family import detect_family, prompt_format
from ..model.decoder import DecoderPool
from .generation import check_prompt_length, clamp_new_tokens, generate_ids
from .request import TokenStream
from .scheduler import Scheduler, cache_budget_bytes
from ..model.transformer import ChatGLMForConditionalGeneration
from ..text.reply import Chatglm3Reply, PlainReply
from .sampling import SamplingParams
from ..text.stops import StopSequenceMatcher
from ..text.tokenizer import ChatGLMTokenizer

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1
DEFAULT_MAX_NEW_TOKENS = 2048
"""``max_new_tokens`` of :meth:`Pipeline.stream` when not given (the service's ``max_tokens`` default)."""
WARMUP_MAX_NEW_TOKENS = 4


@dataclass
class GenerationStats:
    """Filled in by :meth:`Pipeline.stream` as it runs."""

    seed: int | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token: float | None = None
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "stop_token", "max_tokens", "stop_sequence", "context_full", "" if cancelled
    token_budget: int = 0  # max_new_tokens after clamping to what the context leaves
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        n = self.output_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


class TextStream:
    """The text chunks of one reply, as :meth:`Pipeline.stream` returns them. ``close()`` ends it
    from the thread that reads it; ``cancel()`` from any thread (a reader blocked on the engine
    then gets the end of the stream within a decode step)."""

    def __init__(self, chunks: Iterator[str], ids: Iterator[int], cancelled: threading.Event):
        self._chunks, self._ids, self._cancelled = chunks, ids, cancelled

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def cancel(self) -> None:
        self._cancelled.set()
        if isinstance(self._ids, TokenStream):  # its close() is thread-safe: the engine ends the request
            self._ids.close()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} was requested but CUDA is not available "
                           "(no GPU, or a CPU-only torch build); use device='cpu'")
    return device


class Pipeline:
    """``Pipeline.from_pretrained(model_dir)``, then ``build_input_ids``, ``generate``, ``stream``."""

    def __init__(self, model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer,
                 config: ChatGLMConfig, family: str, max_context: int | None = None):
        self.model, self.tokenizer, self.config, self.family = model, tokenizer, config, family
        self.format_name = prompt_format(family)
        self.format = prompts.get_format(self.format_name)
        self.stop_ids = tuple(self.format.STOP_IDS)
        self.max_context = min(max_context or config.seq_length, config.seq_length)
        self.decoders = DecoderPool(model)
        self.scheduler: Scheduler | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device | None = "cpu",
                        dtype: torch.dtype | None = None, quantize: int | None = None,
                        family: str | None = None, max_context: int | None = None) -> "Pipeline":
        """Load config, tokenizer and weights from an official model directory.

        ``dtype`` None picks bfloat16 on CPU and on CUDA GPUs of capability 8.0+, float16 on older
        GPUs; ``quantize=4`` makes an int4 model from an fp16 checkpoint (an int4 checkpoint stays
        int4); ``family`` overrides detection.
        """
        model_dir = Path(model_dir)
        dev = resolve_device(device)
        from ..quant.dispatch import default_dtype
        dtype = dtype or default_dtype(dev)
        config = ChatGLMConfig.from_json(model_dir / "config.json")
        fam = detect_family(model_dir, config, family)
        tokenizer = ChatGLMTokenizer.from_dir(model_dir)
        model, backend = load_for_inference(model_dir, config, dev, dtype, quantize)
        log.info("loaded %s (%s) from %s on %s, %s, int4 backend: %s", fam, config.name_or_path, model_dir,
                 dev, dtype, backend)
        return cls(model, tokenizer, config, fam, max_context)

    def build_input_ids(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids for ``messages`` (prefix included), ready for the assistant's reply."""
        return self.format.build_input_ids(list(messages), self.tokenizer)

    def messages_from_prompt(self, prompt: str) -> list[dict]:
        """A user message, or the messages of a complete raw prompt in the model's own format."""
        if self.format.is_raw_prompt(prompt):
            return self.format.parse_raw_prompt(prompt)
        return [{"role": "user", "content": prompt}]

    def generate(self, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 0.8, top_k: int = 50, repetition_penalty: float = 1.0,
                 seed: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 min_tokens: int = 0) -> Iterator[int]:
        """New token ids after ``input_ids`` (stop ids are not yielded)."""
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, presence_penalty, frequency_penalty,
                                min_tokens)
        return self._generate(list(input_ids), max_new_tokens, params, seed, None)

    def _generate(self, input_ids: list[int], max_new_tokens: int, params: SamplingParams,
                  seed: int | None, stats: GenerationStats | None) -> Iterator[int]:
        check_prompt_length(len(input_ids), self.max_context)
        bad = [i for i in input_ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise ValueError(f"input_ids contains {bad[0]}, outside 0..{self.tokenizer.vocab_size - 1}")
        if seed is None:
            seed = random.SystemRandom().randint(0, MAX_SEED)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed={seed} is out of range: allowed 0 <= seed <= {MAX_SEED}")
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        if stats is not None:
            stats.seed, stats.input_tokens = seed, len(input_ids)
            stats.token_budget = min(max_new_tokens, self.max_context - len(input_ids))
        if self.scheduler is not None:
            budget = clamp_new_tokens(max_new_tokens, len(input_ids), self.max_context)
            if budget == 0:
                return iter(())
            return self.scheduler.submit(input_ids, budget, params, self.stop_ids, generator)
        return generate_ids(self.model, input_ids, max_new_tokens, params, self.stop_ids, self.max_context,
                            generator, vocab_limit=self.tokenizer.vocab_size, decoders=self.decoders)

    def serve(self, max_batch: int, max_waiting: int = 16, prefill_chunk: int | None = None) -> Scheduler:
        """From now on, requests (``generate``, ``stream``, ``chat``) from any number of threads are
        batched on the model by one engine thread: up to ``max_batch`` decode together, up to
        ``max_waiting`` more wait, and beyond that :class:`AtCapacityError` is raised."""
        if self.scheduler is not None:
            raise RuntimeError("this pipeline already serves concurrent requests")
        self.decoders.release()
        self.scheduler = Scheduler(self.model, max_batch, max_waiting, vocab_limit=self.tokenizer.vocab_size,
                                   prefill_chunk=prefill_chunk, max_cache_bytes=cache_budget_bytes(self.model.device))
        return self.scheduler

    def warmup(self, max_new_tokens: int = WARMUP_MAX_NEW_TOKENS) -> float:
        """Run a short generation now (kernels compile, caches and allocators settle) and on CUDA
        capture the decode graph of the bucket a default request uses, so the first prediction is as
        fast as the second. Returns the seconds it took."""
        started = time.perf_counter()
        ids = self.build_input_ids([{"role": "user", "content": "你好"}])
        needed = min(self.max_context, len(ids) + DEFAULT_MAX_NEW_TOKENS)
        if self.decoders.bucketed:
            self.decoders.warmup(needed)
        params = SamplingParams(temperature=0.8)
        for _ in self._generate(ids, min(max_new_tokens, self.max_context - len(ids)), params, 0, None):
            pass
        return time.perf_counter() - started

    def stream(self, messages: Sequence[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.8,
               top_p: float = 0.8, top_k: int = 50, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_sequences: Sequence[str] = (), stats: GenerationStats | None = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, min_tokens: int = 0) -> Iterator[str]:
        """Text deltas of the assistant's reply to ``messages``; never a broken or dropped character.
        A ChatGLM3 tool call arrives as one JSON chunk ``{"tool_call": {...}}`` at the end (stop
        sequences apply to text, not to that chunk)."""
        input_ids = self.build_input_ids(messages)
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, presence_penalty, frequency_penalty,
                                min_tokens)
        stats = stats if stats is not None else GenerationStats()
        ids = self._generate(input_ids, max_new_tokens, params, seed, stats)
        tool_calls = any("tools" in m for m in messages)
        cancelled = threading.Event()
        return TextStream(self._stream_text(ids, stop_sequences, stats, max_new_tokens, tool_calls, cancelled),
                          ids, cancelled)

    def _stream_text(self, ids: Iterator[int], stop_sequences: Sequence[str], stats: GenerationStats,
                     max_new_tokens: int, tool_calls: bool, cancelled: threading.Event) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        reply = Chatglm3Reply(tool_calls) if self.format_name == "chatglm3" else PlainReply()
        matcher = StopSequenceMatcher([s for s in stop_sequences if s])
        start = time.perf_counter()
        first = None
        try:
            for token in ids:
                if cancelled.is_set():
                    return
                now = time.perf_counter()
                if first is None:
                    first = now
                    stats.time_to_first_token = now - start
                stats.output_tokens += 1
                stats.decode_seconds = now - first
                text, hit = matcher.push(reply.push(decoder.push(token)))
                if text:
                    yield text
                if hit:
                    stats.stop_reason = "stop_sequence"
                    return
            if cancelled.is_set() or getattr(ids, "reason", "") == "cancelled":  # the engine ended it
                return
            stats.stop_reason = ("max_tokens" if stats.output_tokens >= max_new_tokens else
                                 "context_full" if stats.output_tokens >= stats.token_budget else "stop_token")
            tail, hit = matcher.push(reply.push(decoder.flush()) + reply.finish())
            if hit:
                stats.stop_reason = "stop_sequence"
            tail += "" if hit else matcher.flush()
            if tail:
                yield tail
            if reply.tool_call is not None and not hit:
                yield reply.tool_call
        finally:
            close = getattr(ids, "close", None)
            if close is not None:
                close()

    def chat(self, messages: Sequence[dict], **kwargs: Any) -> str:
        """The whole reply as one string (the same generator as :meth:`stream`)."""
        return "".join(self.stream(messages, **kwargs))
