"""Token generation: a generator of ids over a KV cache (prefill once, then one token per step)."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch

from ..model.cache import KVCache
from ..model.graph import decoder_pool
from ..model.transformer import ChatGLMForConditionalGeneration
from .sampling import SamplingParams, select_token

log = logging.getLogger(__name__)
PREFILL_CHUNK = 1024
"""Prompts are processed in chunks of this many tokens, so activation memory stays bounded for 32K
prompts. For a 6B model on CPU, 1024 keeps a 2048-token prefill's peak resident memory ~0.35 GB
lower than 2048 at the same speed (97 vs 100 s, ``python -m chatglm.bench``)."""


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context."""


def check_prompt_length(n_prompt: int, max_context: int) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt is empty: at least one input id is needed")
    if n_prompt >= max_context:
        raise ContextLengthError(f"the prompt has {n_prompt} tokens but the context holds {max_context}: "
                                 f"shorten it to at most {max_context - 1} tokens to leave room for a reply")


def generate_ids(model: ChatGLMForConditionalGeneration, input_ids: list[int], max_new_tokens: int,
                 params: SamplingParams, stop_ids: Iterable[int], max_context: int,
                 generator: torch.Generator | None = None, vocab_limit: int | None = None,
                 static: bool | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded), ``max_new_tokens``, or the context is full.

    ``vocab_limit`` masks ids at and above it (the padding rows of the output layer are not tokens).
    The prompt is prefilled eagerly; decode steps then run either the dynamic path over a KV cache
    sized for this request (prompt + new tokens) and freed when the generator ends, or, with
    ``static`` (default: on CUDA), the static step of :mod:`chatglm.graph` (a CUDA graph where it can
    be captured, otherwise the same step eagerly) over its capacity bucket's cache, which the model's
    decoder pool keeps for the next request. Both give the same tokens up to float rounding.
    """
    check_prompt_length(len(input_ids), max_context)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    room = max_context - len(input_ids)
    if max_new_tokens > room:
        log.warning("max_new_tokens=%d clamped to %d: the prompt has %d tokens of a %d-token context",
                    max_new_tokens, room, len(input_ids), max_context)
        max_new_tokens = room
    if max_new_tokens == 0:
        return
    stops = set(stop_ids)
    device = model.device
    needed = len(input_ids) + max_new_tokens
    use_static = device.type == "cuda" if static is None else static
    decoder = decoder_pool(model).acquire(1, needed) if use_static else None
    cache = decoder.cache if decoder is not None else KVCache(model.config, 1, needed, device, model.dtype)
    history = torch.tensor(input_ids, dtype=torch.long)
    produced: list[int] = []

    def choose(logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits[vocab_limit:] = float("-inf")
        previous = torch.cat((history, torch.tensor(produced, dtype=torch.long)))
        return select_token(logits, params, previous, generator)

    # Inference mode is entered around each computation and left before each yield: a suspended
    # generator must not leave the caller's thread in inference mode.
    try:
        with torch.inference_mode():
            for s in range(0, len(input_ids) - PREFILL_CHUNK, PREFILL_CHUNK):
                model(torch.tensor([input_ids[s:s + PREFILL_CHUNK]], device=device), cache=cache, last_only=True)
            tail = input_ids[(len(input_ids) - 1) // PREFILL_CHUNK * PREFILL_CHUNK:]
            token = choose(model(torch.tensor([tail], dtype=torch.long, device=device), cache=cache,
                                 last_only=True)[0, -1])
        while True:
            if token in stops:
                return
            produced.append(token)
            yield token
            if len(produced) == max_new_tokens:
                return
            with torch.inference_mode():
                x = torch.tensor([[token]], dtype=torch.long, device=device)
                logits = decoder.step(x)[0] if decoder is not None else model(x, cache=cache, last_only=True)[0, -1]
                token = choose(logits)
    finally:
        if decoder is not None:
            decoder_pool(model).give_back(decoder)
        else:
            cache.release()
