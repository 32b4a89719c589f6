"""Next-token selection on the model's device, for a batch of rows with their own parameters.

Pure functions of tensors: nothing is read back to the host, so a decode step and its sampling run
without a synchronisation. Sampling is an exponential race: with ``q_i ~ Exp(1)`` independent,
``argmax_i p_i / q_i`` picks ``i`` with probability ``p_i / sum p``, the same distribution as a
multinomial draw, with one random number per candidate and no cumulative sum over the vocabulary.
Each row draws its noise from its own generator, so a seeded request gives the same tokens alone or
beside others on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import torch

GREEDY_BELOW = 1e-5
NON_FINITE = -1
"""The token id reported for a row whose logits hold NaN or an infinity."""


PENALTY_BOUND = 2.0
"""presence_penalty and frequency_penalty lie in ``-PENALTY_BOUND .. PENALTY_BOUND`` (OpenAI's range)."""
MAX_MIN_TOKENS = 32768


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; repetition_penalty 1 = off;
    presence_penalty and frequency_penalty 0 = off (subtracted from the logits of tokens generated so
    far: once for presence, once per occurrence for frequency); min_tokens: stop ids are masked until
    that many tokens have been generated."""

    temperature: float = 0.0
    top_p: float = 0.8
    top_k: int = 50
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0

    def __post_init__(self):
        checks = [("temperature", self.temperature, 0.0, 100.0), ("top_p", self.top_p, 0.0, 1.0),
                  ("top_k", self.top_k, 0, 1_000_000), ("repetition_penalty", self.repetition_penalty, 0.01, 100.0),
                  ("presence_penalty", self.presence_penalty, -PENALTY_BOUND, PENALTY_BOUND),
                  ("frequency_penalty", self.frequency_penalty, -PENALTY_BOUND, PENALTY_BOUND),
                  ("min_tokens", self.min_tokens, 0, MAX_MIN_TOKENS)]
        for name, value, lo, hi in checks:
            if not (lo <= value <= hi):  # also rejects NaN
                raise ValueError(f"{name}={value!r} is out of range: allowed {lo} <= {name} <= {hi}")

    @property
    def greedy(self) -> bool:
        # Below this, sampling already picks the most likely token, and dividing float32 logits by a
        # temperature under ~1e-38 overflows to inf: such temperatures are greedy.
        return self.temperature < GREEDY_BELOW


class RowParams(NamedTuple):
    """The parameters of ``B`` rows as device tensors (see :func:`row_params`)."""

    temperature: torch.Tensor  # float32 [B, 1] (1 for greedy rows)
    top_k: torch.Tensor  # long [B, 1], 0 = off
    top_p: torch.Tensor  # float32 [B, 1]
    penalty: torch.Tensor  # float32 [B, 1]
    presence: torch.Tensor  # float32 [B, 1]
    frequency: torch.Tensor  # float32 [B, 1]
    min_tokens: torch.Tensor  # long [B, 1]
    greedy: torch.Tensor  # bool [B]
    all_greedy: bool
    any_penalty: bool
    any_counts: bool
    any_min_tokens: bool


def row_params(params: Sequence[SamplingParams], device: torch.device) -> RowParams:
    """Stack per-row parameters into device tensors once per batch composition."""
    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)

    greedy = [p.greedy for p in params]
    return RowParams(col([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
                     col([p.top_k for p in params], torch.long), col([p.top_p for p in params], torch.float32),
                     col([p.repetition_penalty for p in params], torch.float32),
                     col([p.presence_penalty for p in params], torch.float32),
                     col([p.frequency_penalty for p in params], torch.float32),
                     col([p.min_tokens for p in params], torch.long),
                     torch.tensor(greedy, dtype=torch.bool, device=device), all(greedy),
                     any(p.repetition_penalty != 1.0 for p in params),
                     any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params),
                     any(p.min_tokens > 0 for p in params))


class History(NamedTuple):
    """What the penalties and ``min_tokens`` need to know of each row's tokens so far (device tensors)."""

    seen: torch.Tensor | None  # bool [B, V]: prompt and generated ids (repetition penalty)
    counts: torch.Tensor | None  # float32 [B, V]: generated ids (presence / frequency penalties)
    produced: torch.Tensor  # long [B, 1]: tokens generated

    def row(self, i: int) -> "History":
        """Row ``i`` as a one-row history sharing this one's memory (updates show in both)."""
        def view(t):
            return None if t is None else t[i:i + 1]
        return History(view(self.seen), view(self.counts), self.produced[i:i + 1])


def new_history(prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device, seen: bool,
                counts: bool) -> History:
    """The history of rows that have generated nothing yet after ``prompts``, keeping the seen ids
    (for the repetition penalty) and the generated counts (presence / frequency) when asked."""
    B = len(prompts)
    seen_ids = generated = None
    if seen:
        seen_ids = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        for b, prompt in enumerate(prompts):
            seen_ids[b, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
    if counts:
        generated = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
    return History(seen_ids, generated, torch.zeros(B, 1, dtype=torch.long, device=device))


def record(history: History, tokens: torch.Tensor) -> None:
    """Add ``tokens [B]`` (one per row) to ``history`` in place (no host sync)."""
    index = tokens.clamp_min(0).view(-1, 1)  # a NON_FINITE row ends its request
    if history.seen is not None:
        history.seen.scatter_(1, index, True)
    if history.counts is not None:
        history.counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    history.produced.add_(1)


def stack_histories(histories: Sequence[History]) -> History:
    """One batch history from single-row ones (for rows batched together in a step)."""
    def cat(parts):
        return None if all(p is None for p in parts) else torch.cat(parts)

    first = histories[0]
    if any((h.seen is None) != (first.seen is None) or (h.counts is None) != (first.counts is None) for h in histories):
        raise ValueError("rows batched together need histories of the same kind: make them with the batch's RowParams")
    return History(cat([h.seen for h in histories]), cat([h.counts for h in histories]),
                   torch.cat([h.produced for h in histories]))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Tokens already present (``seen`` bool ``[B, V]``): positive logits divided by the row's
    penalty, negative ones multiplied by it."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_history(logits: torch.Tensor, rows: RowParams, history: History | None,
                  stop_ids: torch.Tensor | None) -> torch.Tensor:
    """The repetition, presence and frequency penalties, and stop ids masked while a row has
    generated fewer than its ``min_tokens``."""
    if history is None:
        return logits
    V = logits.shape[-1]
    if rows.any_penalty and history.seen is not None:
        logits = apply_repetition_penalty(logits, history.seen[:, :V], rows.penalty)
    if rows.any_counts and history.counts is not None:
        counts = history.counts[:, :V]
        logits = logits - rows.presence * (counts > 0) - rows.frequency * counts
    if rows.any_min_tokens and stop_ids is not None and stop_ids.numel():
        early = history.produced < rows.min_tokens  # [B, 1]
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, stop_ids] = True
        logits = logits.masked_fill(mask & early, float("-inf"))
    return logits


def filter_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which of the descending ``sorted_logits [B, V]`` (already divided by the temperature) survive
    top-k (every token tied with the k-th kept) and then top-p (the smallest prefix whose probability
    mass reaches p, at least one token); bool ``[B, V]``."""
    V = sorted_logits.shape[-1]
    kth = sorted_logits.gather(-1, (top_k.clamp(1, V) - 1))
    keep = (sorted_logits >= kth) | (top_k <= 0)
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    keep &= mass_before < top_p
    keep[:, 0] = True  # the most likely token always stays (top_p = 0 keeps only it)
    return keep


def min_tokens_stop_ids(stop_sets: Iterable[Iterable[int]], device: torch.device) -> torch.Tensor | None:
    """The stop ids of the rows still under their ``min_tokens`` (one set per such row), as the
    ``stop_ids`` of :func:`next_tokens`; None when there are none."""
    stops = sorted(set().union(*stop_sets))
    return torch.tensor(stops, dtype=torch.long, device=device) if stops else None


def next_tokens(logits: torch.Tensor, rows: RowParams, history: History | None,
                generators: Sequence[torch.Generator | None], vocab_limit: int | None = None,
                stop_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row, long ``[B]`` on ``logits``' device (:data:`NON_FINITE` for a row
    whose logits are not all finite). ``logits [B, V]`` float32; ``history`` holds each row's tokens
    so far (penalties, ``min_tokens``); ``vocab_limit`` masks ids at and above it; ``stop_ids`` (long,
    on the device) are masked until a row has its ``min_tokens``."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    bad = ~torch.isfinite(logits).all(dim=-1)
    logits = apply_history(logits, rows, history, stop_ids)
    choice = logits.argmax(dim=-1)
    if not rows.all_greedy:
        scaled = logits / rows.temperature
        draw = sample_candidates if logits.device.type == "cpu" else sample_sorted
        choice = torch.where(rows.greedy, choice, draw(scaled, rows, generators))
    return torch.where(bad, torch.full_like(choice, NON_FINITE), choice)


def _race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Index of the winner of the exponential race over ``probs [..., n]`` (one draw per entry)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    noise.clamp_min_(torch.finfo(torch.float32).tiny)  # never 0 / 0 for a filtered-out candidate
    return (probs / noise).argmax(dim=-1)


def sample_sorted(scaled: torch.Tensor, rows: RowParams, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw from every row at once over its whole vocabulary, stably sorted (no host sync; the GPU path)."""
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    keep = filter_sorted(sorted_logits, rows.top_k, rows.top_p)
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(-1)
    picks = torch.stack([_race(probs[b], gen) for b, gen in enumerate(generators)])
    return order.gather(-1, picks[:, None]).squeeze(-1)


def _draw(vals: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One row's draw over its candidates: ``vals`` descending (ties in id order), ``ids`` theirs,
    top-p then the race."""
    keep = filter_sorted(vals[None], torch.zeros(1, 1, dtype=torch.long, device=vals.device), top_p)[0]
    probs = vals.masked_fill(~keep, float("-inf")).softmax(-1)
    return ids[_race(probs, generator)]


def sample_candidates(scaled: torch.Tensor, rows: RowParams, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The same draw over the top-k candidates only (every id tied with the k-th included, stably
    sorted so that ties stay in id order): on CPU this costs a fraction of sorting the whole
    vocabulary. Finding the candidates and sorting them is one set of ops for all rows; each row's
    top-p, softmax and race then run on its own candidates, the same ops on the same values as for
    that row alone (so a seeded row draws the same token in any batch). Reads each row's k and
    candidate count on the host."""
    B, V = scaled.shape
    out = torch.zeros(B, dtype=torch.long, device=scaled.device)  # rows left at 0 are reported NON_FINITE
    finite = torch.isfinite(scaled).all(dim=-1).tolist()
    ks = rows.top_k.view(-1).tolist()
    narrow = [b for b in range(B) if finite[b] and 0 < ks[b] < V]
    slot = {b: i for i, b in enumerate(narrow)}
    if narrow:
        vals, cand, counts = _top_k_candidates(scaled, rows.top_k, narrow)
    for b in range(B):  # in row order: rows may share a generator
        if b in slot:
            i = slot[b]
            out[b] = _draw(vals[i, :counts[i]], cand[i, :counts[i]], rows.top_p[b:b + 1], generators[b])
        elif finite[b]:  # top-k off: every id is a candidate
            row_vals, order = torch.sort(scaled[b], descending=True, stable=True)
            out[b] = _draw(row_vals, order, rows.top_p[b:b + 1], generators[b])
    return out


def _top_k_candidates(scaled: torch.Tensor, top_k: torch.Tensor,
                      rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """For ``rows`` of ``scaled`` (finite, ``0 < k < V``): the values of every id at or above the
    row's k-th largest, sorted descending with ties in id order, their ids, both ``[len(rows), C]``
    padded with -inf after each row's own count, and the counts."""
    index = torch.tensor(rows, dtype=torch.long, device=scaled.device)
    x = scaled if len(rows) == scaled.shape[0] else scaled.index_select(0, index)
    k = top_k.index_select(0, index)
    kth = torch.topk(x, int(k.max()), dim=-1).values.gather(1, k - 1)
    row, ids = torch.nonzero(x >= kth, as_tuple=True)  # row-major: each row's ids ascending
    counts = torch.bincount(row, minlength=len(rows))
    col = torch.arange(row.numel(), device=x.device) - (counts.cumsum(0) - counts)[row]
    width = int(counts.max())
    padded = x.new_full((len(rows), width), float("-inf"))
    padded[row, col] = x[row, ids]
    cand = torch.zeros(len(rows), width, dtype=torch.long, device=x.device)
    cand[row, col] = ids
    vals, order = torch.sort(padded, dim=-1, descending=True, stable=True)  # the padding sorts last
    return vals, cand.gather(1, order), counts.tolist()
