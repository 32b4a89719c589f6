"""Sampling on the device (run here on CPU tensors): the exponential race draws from exactly the
filtered softmax distribution (chi-square against the exact probabilities), seeds reproduce, each row
of a batch keeps its own parameters and generator, and non-finite logits are reported."""
from __future__ import annotations

import math

import pytest
import torch

from chatglm.serving import sampling
from chatglm.serving.sampling import NON_FINITE, SamplingParams, apply_repetition_penalty, filter_sorted, History, \
    min_tokens_stop_ids, new_history, next_tokens, record, row_params

CPU = torch.device("cpu")


def reference_probs(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The intended distribution, computed directly over the vocabulary (the definition, not the code
    under test): penalty, temperature, top-k keeping ties at the k-th value, top-p over what is left."""
    x = logits.clone()
    if seen is not None:
        x[seen] = torch.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    x = x / p.temperature
    if p.top_k > 0:
        x[x < torch.topk(x, min(p.top_k, x.numel())).values[-1]] = float("-inf")
    probs = x.softmax(-1)
    order = torch.argsort(probs, descending=True, stable=True)
    mass_before = 0.0
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for i in order.tolist():
        if probs[i] == 0 or (mass_before >= p.top_p and keep.any()):
            break
        keep[i] = True
        mass_before += float(probs[i])
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic (Wilson-Hilferty normal approximation)."""
    n = counts.sum()
    support = probs > 0
    expected = probs[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("params", [SamplingParams(1.0, 1.0, 0), SamplingParams(0.7, 0.9, 7),
                                    SamplingParams(1.3, 0.6, 0), SamplingParams(0.8, 0.8, 50, 1.4)],
                         ids=["plain", "top-k+top-p", "top-p", "defaults+penalty"])
@pytest.mark.parametrize("path", ["candidates", "sorted"], ids=["cpu-candidates", "gpu-sorted"])
def test_the_race_draws_the_filtered_softmax_distribution(params, path, monkeypatch):
    """Both drawing paths (the GPU's whole-vocabulary sort and the CPU's top-k candidates) draw
    from the intended distribution; here both run on CPU tensors."""
    if path == "sorted":
        monkeypatch.setattr(sampling, "sample_candidates", sampling.sample_sorted)
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 40, generator=gen) * 1.5
    seen = torch.zeros(1, 40, dtype=torch.bool)
    seen[0, [1, 5, 9]] = True
    want = reference_probs(logits[0], params, seen[0] if params.repetition_penalty != 1 else None)
    rows = row_params([params] * 250, CPU)
    history = History(seen.expand(250, -1), None, torch.zeros(250, 1, dtype=torch.long))
    draws = torch.cat([next_tokens(logits.expand(250, -1), rows, history, [gen] * 250) for _ in range(40)])
    counts = torch.bincount(draws, minlength=40).double()
    assert set(draws.tolist()) <= set(torch.nonzero(want).flatten().tolist())
    assert chi_square_p_value(counts, want.double()) > 1e-3
    multinomial = torch.multinomial(want, 20000, replacement=True, generator=gen)  # the distribution it replaces
    assert chi_square_p_value(torch.bincount(multinomial, minlength=40).double(), want.double()) > 1e-3


def test_ties_at_the_kth_value_are_kept_and_top_p_zero_keeps_the_top():
    tie = torch.zeros(1, 50)
    tie[0, 5] = 1.0
    rows = row_params([SamplingParams(1.0, 1.0, 2)], CPU)
    gen = torch.Generator().manual_seed(2)
    picks = {int(next_tokens(tie, rows, None, [gen])) for _ in range(400)}
    assert 5 in picks and len(picks) > 10
    sorted_logits = torch.tensor([[3.0, 2.0, 1.0]])
    assert filter_sorted(sorted_logits, torch.tensor([[0]]), torch.tensor([[0.0]])).tolist() == [[True, False, False]]


def test_seeds_reproduce_and_each_row_keeps_its_own_parameters_and_generator():
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(0.9, 0.95, 0), SamplingParams(0.0), SamplingParams(1.2, 0.8, 20)]

    def alone(i, seed, n=30):
        g = torch.Generator().manual_seed(seed)
        return [int(next_tokens(logits[i:i + 1], row_params([params[i]], CPU), None, [g])) for _ in range(n)]

    def together(seeds, n=30):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        rows = row_params(params, CPU)
        return list(zip(*[next_tokens(logits, rows, None, gens).tolist() for _ in range(n)]))

    batch = together([1, 2, 3])
    assert [list(r) for r in batch] == [alone(0, 1), alone(1, 2), alone(2, 3)]
    assert alone(0, 1) != alone(0, 9)
    assert set(batch[1]) == {int(logits[1].argmax())}  # the greedy row


def test_penalty_vocab_limit_and_non_finite_rows():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 9.0]])
    rows = row_params([SamplingParams(0.0, repetition_penalty=2.0)], CPU)
    history = new_history([[1]], 5, CPU, rows.any_penalty, rows.any_counts)
    record(history, torch.tensor([3]))
    assert history.seen.tolist() == [[False, True, False, True, False]] and history.produced.tolist() == [[1]]
    assert apply_repetition_penalty(logits, history.seen, torch.tensor([[2.0]])).tolist() == [[2.0, -2.0, 0.5, 1.5, 9.0]]
    assert int(next_tokens(logits, rows, history, [None], vocab_limit=4)) == 0  # id 4 masked, 3 penalised
    bad = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0], [float("inf"), 0.0, 0.0]])
    for greedy in (True, False):
        p = SamplingParams(0.0) if greedy else SamplingParams(1.0)
        got = next_tokens(bad, row_params([p] * 3, CPU), None, [None] * 3).tolist()
        assert got[0] == NON_FINITE and got[2] == NON_FINITE and got[1] in (0, 1, 2)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0]])
    rows = row_params([SamplingParams(0.0, presence_penalty=0.5, frequency_penalty=0.1)], CPU)
    history = new_history([[1, 1, 1]], 4, CPU, rows.any_penalty, rows.any_counts)  # the prompt does not count
    assert int(next_tokens(logits, rows, history, [None])) == 0
    for _ in range(2):
        record(history, torch.tensor([0]))
    assert history.counts.tolist() == [[2.0, 0.0, 0.0, 0.0]]
    # id 0: 3.0 - 0.5 - 0.2 = 2.3 < 2.9
    assert int(next_tokens(logits, rows, history, [None])) == 1
    negative = row_params([SamplingParams(0.0, presence_penalty=-2.0)], CPU)  # OpenAI: < 0 encourages repeats
    h = new_history([[0]], 4, CPU, negative.any_penalty, negative.any_counts)
    record(h, torch.tensor([2]))
    assert int(next_tokens(logits, negative, h, [None])) == 2
    with pytest.raises(ValueError, match="presence_penalty=2.5 is out of range"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=float("nan"))


def test_min_tokens_masks_the_stop_ids_until_reached():
    logits = torch.tensor([[1.0, 5.0, 2.0]])  # id 1 is the stop id and the most likely
    rows = row_params([SamplingParams(0.0, min_tokens=2)], CPU)
    history = new_history([[0]], 3, CPU, rows.any_penalty, rows.any_counts)
    stops = torch.tensor([1])
    picks = []
    for _ in range(3):
        token = next_tokens(logits, rows, history, [None], stop_ids=stops)
        picks.append(int(token))
        record(history, token)
    assert picks == [2, 2, 1]


def _row_by_row(scaled: torch.Tensor, rows, generators) -> torch.Tensor:
    """The CPU draw written one row at a time over plain ops (the definition the batched candidate
    search must reproduce bit for bit, draws taken in row order)."""
    out = []
    for b, gen in enumerate(generators):
        x = scaled[b]
        if not bool(torch.isfinite(x).all()):
            out.append(0)
            continue
        k = int(rows.top_k[b, 0])
        ids = torch.arange(x.numel()) if k <= 0 or k >= x.numel() else \
            torch.nonzero(x >= torch.topk(x, k).values[-1]).flatten()
        vals, order = torch.sort(x[ids], descending=True, stable=True)
        keep = filter_sorted(vals[None], torch.zeros(1, 1, dtype=torch.long), rows.top_p[b:b + 1])[0]
        probs = vals.masked_fill(~keep, float("-inf")).softmax(-1)
        out.append(int(ids[order[sampling._race(probs, gen)]]))
    return torch.tensor(out)


@pytest.mark.parametrize("shared", [False, True], ids=["own-generators", "one-shared-generator"])
def test_batched_candidates_draw_exactly_what_each_row_draws_alone(shared):
    """Mixed k (off, 1, ties at the k-th, k >= V), top-p, -inf and NaN rows: the same tokens as the
    row-by-row definition, with the generators consumed in row order."""
    gen = torch.Generator().manual_seed(21)
    V = 300
    logits = (torch.randn(6, V, generator=gen) * 3).round() / 2  # many ties
    logits[1, 7] = float("-inf")
    logits[4, 0] = float("nan")
    params = [SamplingParams(0.8, 0.8, 50), SamplingParams(1.0, 1.0, 0), SamplingParams(0.7, 0.5, 1),
              SamplingParams(1.3, 0.95, 5), SamplingParams(1.0, 0.9, 20), SamplingParams(0.9, 0.0, V + 2)]
    rows = row_params(params, CPU)
    scaled = logits / rows.temperature
    for step in range(12):
        def gens():
            seeds = [step] * 6 if shared else [100 * step + b for b in range(6)]
            one = torch.Generator().manual_seed(seeds[0])
            return [one] * 6 if shared else [torch.Generator().manual_seed(s) for s in seeds]
        got = sampling.sample_candidates(scaled, rows, gens())
        assert got.tolist() == _row_by_row(scaled, rows, gens()).tolist()


def test_min_tokens_stop_ids_are_the_sorted_union_or_none():
    got = min_tokens_stop_ids([{2, 64795}, {2}, {31}], CPU)
    assert got.dtype == torch.long and got.tolist() == [2, 31, 64795]
    assert min_tokens_stop_ids([], CPU) is None
    assert min_tokens_stop_ids([set()], CPU) is None  # under min_tokens, but nothing to hold back
