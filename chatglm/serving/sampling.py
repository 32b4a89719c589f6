"""Pure next-token selection functions on a 1-D logits vector (float32)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; repetition_penalty 1 = off."""

    temperature: float = 0.0
    top_p: float = 0.8
    top_k: int = 50
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = [("temperature", self.temperature, 0.0, 100.0), ("top_p", self.top_p, 0.0, 1.0),
                  ("top_k", self.top_k, 0, 1_000_000), ("repetition_penalty", self.repetition_penalty, 0.01, 100.0)]
        for name, value, lo, hi in checks:
            if not (lo <= value <= hi):  # also rejects NaN
                raise ValueError(f"{name}={value!r} is out of range: allowed {lo} <= {name} <= {hi}")

    @property
    def greedy(self) -> bool:
        # Below this, sampling already picks the most likely token, and dividing float32 logits by a
        # temperature under ~1e-38 overflows to inf: such temperatures are greedy.
        return self.temperature < GREEDY_BELOW


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already present: positive logits are divided by ``penalty``, negative multiplied."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    ids = previous.unique()
    picked = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (ties at the boundary kept), the rest become -inf."""
    if k <= 0 or k >= logits.numel():
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[0] = False  # the most likely token is always kept (top_p=0 keeps only it)
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select_token(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor,
                 generator: torch.Generator | None = None) -> int:
    """Pick the next token id from ``logits [vocab]`` (CPU float32). Greedy when temperature is 0.

    With ``top_k`` on, top-p and the draw run on the top-k candidates only (ties at the k-th value
    included), the same distribution as filtering the whole vocabulary, at a fraction of the cost."""
    logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    ids = None
    if 0 < params.top_k < logits.numel():
        threshold = torch.topk(logits, params.top_k).values[-1]
        ids = torch.nonzero(logits >= threshold).flatten()
        logits = logits[ids]
    logits = apply_top_p(logits / params.temperature, params.top_p)
    choice = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    return choice if ids is None else int(ids[choice])
