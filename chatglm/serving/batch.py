"""The rows that decode together in one engine step and their device tensors."""
from __future__ import annotations

from typing import Protocol

import torch

from .sampling import History, SamplingParams, min_tokens_stop_ids, row_params, stack_histories


class Row(Protocol):
    """What a batch reads of a request (the scheduler's sequence)."""

    prompt: list[int]
    params: SamplingParams
    stops: set[int]
    history: History | None
    token: int | None
    produced: int


def min_tokens_stops(rows: list[Row], device: torch.device) -> torch.Tensor | None:
    """The stop ids that rows still under their ``min_tokens`` must not draw (None when there are none)."""
    return min_tokens_stop_ids((s.stops for s in rows if s.params.min_tokens), device)


class DecodeBatch:
    """The device tensors of the rows that decode together, built when the rows change (one joins,
    leaves or sits out a step) and advanced in place while they stay the same: their sampling
    parameters, stop ids, last tokens, positions and histories. Each row's history becomes a view
    of the batch's, so it carries on from there into the next batch it joins."""

    def __init__(self, rows: list[Row], device: torch.device):
        self.rows = list(rows)
        self.params = row_params([s.params for s in rows], device)
        self.stops = min_tokens_stops(rows, device)
        self.ids = torch.tensor([[s.token] for s in rows], dtype=torch.long, device=device)
        self.pos = torch.tensor([[len(s.prompt) + s.produced - 1] for s in rows], dtype=torch.long, device=device)
        self.history = stack_histories([s.history for s in rows])
        for i, s in enumerate(rows):
            s.history = self.history.row(i)
        self.tokens: torch.Tensor | None = None  # what the last step sampled, one per row

    def advance(self) -> None:
        """The next step of the same rows: each feeds the token it was just given, one position on."""
        if self.tokens is None:
            raise RuntimeError("advance() before a step sampled tokens for this batch")
        self.ids = self.tokens.view(-1, 1)
        self.pos.add_(1)
