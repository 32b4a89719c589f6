"""Token generation: a generator of ids. The prompt is prefilled in chunks into a cache slot of the
model's :class:`~chatglm.model.decoder.DecoderPool`, then one token per step is decoded and sampled on
the device. The only host transfer per token is the new id itself, copied while the next step already
runs (the stop check and the caller need it): nothing waits for the device between steps."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch

from ..model.decoder import DecoderPool
from ..model.transformer import ChatGLMForConditionalGeneration
from .sampling import NON_FINITE, SamplingParams, min_tokens_stop_ids, new_history, next_tokens, record, row_params

log = logging.getLogger(__name__)
PREFILL_CHUNK = 1024
"""Prompts are processed in chunks of this many tokens, so activation memory stays bounded for 32K
prompts. For a 6B model on CPU, 1024 keeps a 2048-token prefill's peak resident memory ~0.35 GB
lower than 2048 at the same speed (97 vs 100 s, ``python -m chatglm.bench``)."""


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context."""


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits."""


def check_prompt_length(n_prompt: int, max_context: int) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt is empty: at least one input id is needed")
    if n_prompt >= max_context:
        raise ContextLengthError(f"the prompt has {n_prompt} tokens but the context holds {max_context}: "
                                 f"shorten it to at most {max_context - 1} tokens to leave room for a reply")


def clamp_new_tokens(max_new_tokens: int, n_prompt: int, max_context: int) -> int:
    """``max_new_tokens`` cut to what the context leaves after the prompt (logged when it is cut)."""
    room = max_context - n_prompt
    if max_new_tokens > room:
        log.warning("max_new_tokens=%d clamped to %d: the prompt has %d tokens of a %d-token context",
                    max_new_tokens, room, n_prompt, max_context)
        return room
    return max_new_tokens


class TokenReader:
    """Brings token ids to the host without waiting for work queued after them: on CUDA each copy
    goes to pinned memory behind an event, so reading it waits for that copy only."""

    def __init__(self, device: torch.device, batch: int = 1):
        self.cuda = device.type == "cuda"
        self._host = torch.empty(batch, dtype=torch.long, pin_memory=self.cuda)
        self._event = torch.cuda.Event() if self.cuda else None
        self._pending: torch.Tensor | None = None

    def start(self, tokens: torch.Tensor) -> None:
        if self.cuda:
            self._host.copy_(tokens, non_blocking=True)
            self._event.record()
        else:
            self._pending = tokens

    def read(self) -> list[int]:
        if self.cuda:
            self._event.synchronize()
            return self._host.tolist()
        return self._pending.tolist()


def non_finite_error(step: int) -> NonFiniteLogitsError:
    where = "for the prompt" if step == 0 else f"at generated token {step + 1}"
    return NonFiniteLogitsError(f"the model produced NaN or infinite logits {where}: the weights are likely "
                                "corrupted or the dtype overflowed; re-download or re-convert the weights "
                                "(python -m chatglm.download), or load with dtype=torch.float32 to check")


def generate_ids(model: ChatGLMForConditionalGeneration, input_ids: list[int], max_new_tokens: int,
                 params: SamplingParams, stop_ids: Iterable[int], max_context: int,
                 generator: torch.Generator | None = None, vocab_limit: int | None = None,
                 decoders: DecoderPool | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded), ``max_new_tokens``, or the context is full.

    ``generator`` (on the model's device) seeds sampling; ``vocab_limit`` masks ids at and above it
    (the padding rows of the output layer are not tokens). ``decoders`` owns the KV cache (and on
    CUDA the decode graphs); without it a pool is made for this call, eager, freed at the end.
    Raises :class:`NonFiniteLogitsError` when the logits stop being finite, greedy or sampled.
    """
    check_prompt_length(len(input_ids), max_context)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    max_new_tokens = clamp_new_tokens(max_new_tokens, len(input_ids), max_context)
    if max_new_tokens == 0:
        return
    stops = set(stop_ids)
    device = model.device
    pool = decoders if decoders is not None else DecoderPool(model, keep=0, use_graphs=False)
    step = pool.acquire(len(input_ids) + max_new_tokens)
    rows = row_params([params], device)
    reader = TokenReader(device)
    history = new_history([input_ids], model.config.padded_vocab_size, device, rows.any_penalty, rows.any_counts)
    stop_tensor = min_tokens_stop_ids([stops] if params.min_tokens else [], device)
    # Inference mode is entered around each computation and left before each yield: a suspended
    # generator must not leave the caller's thread in inference mode.
    try:
        with torch.inference_mode():
            logits = None
            for start in range(0, len(input_ids), PREFILL_CHUNK):
                logits = step.prefill(input_ids[start:start + PREFILL_CHUNK], 0, start)
            token = next_tokens(logits[None], rows, history, [generator], vocab_limit, stop_tensor)
            pos = torch.full((1, 1), len(input_ids), dtype=torch.long, device=device)
        def advance(i: int) -> torch.Tensor:
            with torch.inference_mode():
                record(history, token)
                logits = step.step(token.view(1, 1), pos, span=len(input_ids) + i + 1)
                pos.add_(1)
                return next_tokens(logits, rows, history, [generator], vocab_limit, stop_tensor)

        # On CUDA the next step is queued before waiting for this token, so the device never idles
        # on the host; on CPU (synchronous anyway) nothing runs ahead of what the caller consumes.
        ahead = reader.cuda
        for i in range(max_new_tokens):
            more = i + 1 < max_new_tokens
            reader.start(token)
            if ahead and more:
                token = advance(i)
            value = reader.read()[0]
            if value == NON_FINITE:
                raise non_finite_error(i)
            if value in stops:
                return
            yield value
            if more and not ahead:
                token = advance(i)
    finally:
        pool.give_back(step)
        if decoders is None:
            pool.release()
