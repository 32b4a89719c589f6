"""The engine thread that batches concurrent requests: each request gives exactly what it gives
alone, whenever it joins or leaves; cancel and failure touch only their own request; a full queue
answers at once; no KV cache outlives its request."""
from __future__ import annotations

import threading

import pytest
import torch

from chatglm.config import ChatGLMConfig
from chatglm.model.cache import cache_usage
from chatglm.serving.generation import generate_ids
from chatglm.serving.sampling import SamplingParams
from chatglm.serving.scheduler import AtCapacityError, Scheduler
from chatglm.weights.checkpoint import load_model
from tests.tiny import random_state, tiny_config, write_model

PROMPTS = [[64790, 64792, 36474, 54591, 31123, 13, 30910], [64790, 64792, 100, 2000, 3],
           [64790, 64792, 5000, 77, 3, 13, 100, 2000, 30910, 54591, 31123], [64790, 64792, 9]]
GREEDY = SamplingParams(0.0)
SAMPLED = SamplingParams(0.9, 0.9, 40, 1.1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_config(rope_ratio=50, seq_length=96)
    d = write_model(tmp_path_factory.mktemp("sched"), cfg, random_state(cfg, seed=9), "safetensors")
    return load_model(d, ChatGLMConfig.from_json(d / "config.json"))


@pytest.fixture
def scheduler(model):
    before = cache_usage().live
    s = Scheduler(model, max_batch=4, max_waiting=8, prefill_chunk=4)
    yield s
    s.close()
    assert cache_usage().live == before, "a request's KV cache outlived it"


def solo(model, prompt, n, params=GREEDY, seed=None, stops=()):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(generate_ids(model, prompt, n, params, stops, 96, gen))


def submit(s, prompt, n, params=GREEDY, seed=None, stops=()):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return s.submit(prompt, n, params, stops, gen)


def test_concurrent_requests_each_give_their_solo_output(model, scheduler):
    want = [solo(model, p, 20) for p in PROMPTS] + [solo(model, p, 16, SAMPLED, seed=i) for i, p in enumerate(PROMPTS)]
    results = {}

    def run(i):
        p = PROMPTS[i % 4]
        stream = submit(scheduler, p, 20) if i < 4 else submit(scheduler, p, 16, SAMPLED, seed=i - 4)
        results[i] = list(stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == want
    assert max(scheduler.stats.batch_sizes) > 1, "the requests never decoded together"


@pytest.mark.parametrize("join_after", [0, 1, 3, 7, 12])
def test_a_request_joining_at_any_step_leaves_both_outputs_unchanged(model, scheduler, join_after):
    first_want, second_want = solo(model, PROMPTS[2], 14), solo(model, PROMPTS[0], 9, SAMPLED, seed=5)
    first = submit(scheduler, PROMPTS[2], 14)
    got = [next(first) for _ in range(join_after)]
    second = submit(scheduler, PROMPTS[0], 9, SAMPLED, seed=5)
    got += list(first)
    assert got == first_want and list(second) == second_want


def test_per_request_stop_ids_and_max_tokens(model, scheduler):
    free = solo(model, PROMPTS[1], 20)
    stop = free[5]
    a = submit(scheduler, PROMPTS[1], 20, stops=(stop,))
    b = submit(scheduler, PROMPTS[1], 3)
    assert list(a) == free[:free.index(stop)] and a.reason == "stop_token"
    assert list(b) == free[:3] and b.reason == "max_tokens"
    late = SamplingParams(0.0, min_tokens=8, presence_penalty=0.5, frequency_penalty=0.3)
    want = solo(model, PROMPTS[1], 20, late, stops=(stop,))
    c = submit(scheduler, PROMPTS[1], 20, late, stops=(stop,))
    d = submit(scheduler, PROMPTS[0], 20)  # batched beside a row without those parameters
    assert list(c) == want and len(want) >= 8 and list(d) == solo(model, PROMPTS[0], 20)


def test_cancel_frees_the_slot_and_leaves_the_others_unchanged(model, scheduler):
    want = solo(model, PROMPTS[3], 25)
    keep = submit(scheduler, PROMPTS[3], 25)
    drop = submit(scheduler, PROMPTS[0], 60)
    got = [next(keep) for _ in range(3)]
    next(drop)
    drop.close()
    got += list(keep)
    assert got == want
    list(drop)  # what was produced before the cancel, then the end
    assert drop.reason == "cancelled"
    assert scheduler.load() == (0, 0) and scheduler.stats.cancelled == 1


def test_a_request_that_fails_in_prefill_fails_alone(model, scheduler, monkeypatch):
    import chatglm.serving.scheduler as sched
    real = sched.KVCache

    def cache(cfg, batch, capacity, device, dtype):
        if capacity == len(PROMPTS[1]) + 7:
            raise RuntimeError("out of memory (injected)")
        return real(cfg, batch, capacity, device, dtype)

    monkeypatch.setattr(sched, "KVCache", cache)
    want = solo(model, PROMPTS[0], 10)
    ok = submit(scheduler, PROMPTS[0], 10)
    bad = submit(scheduler, PROMPTS[1], 7)
    with pytest.raises(RuntimeError, match="injected"):
        list(bad)
    assert list(ok) == want and scheduler.stats.failed == 1


def test_beyond_capacity_a_request_is_refused_at_once(model):
    s = Scheduler(model, max_batch=1, max_waiting=1, prefill_chunk=4)
    try:
        a = submit(s, PROMPTS[0], 40)
        next(a)
        b = submit(s, PROMPTS[1], 5)
        with pytest.raises(AtCapacityError, match="at capacity: 1 predictions running and 1 waiting"):
            submit(s, PROMPTS[2], 5)
        a.close()
        assert list(b) == solo(model, PROMPTS[1], 5)
    finally:
        s.close()
    with pytest.raises(AtCapacityError, match="needs a .* KV cache"):
        Scheduler(model, 1, 0, max_cache_bytes=1024).submit(PROMPTS[0], 10, GREEDY, ())


def test_many_mixed_requests_leak_no_slot(model):
    before = cache_usage().live
    scheduler = Scheduler(model, max_batch=4, max_waiting=40, prefill_chunk=4)
    try:
        streams = []
        for i in range(40):
            s = submit(scheduler, PROMPTS[i % 4], 3 + i % 5, SAMPLED if i % 2 else GREEDY, seed=i)
            streams.append(s)
            if i % 7 == 0:
                s.close()
        for s in streams:
            list(s)
        assert scheduler.load() == (0, 0)
    finally:
        scheduler.close()
    assert cache_usage().live == before


def test_a_row_that_sits_out_and_rejoins_carries_its_history(model, scheduler):
    """The batch's tensors are rebuilt whenever its rows change: penalties that read each row's
    tokens so far still see all of them after the row sat out (an unread stream) and came back."""
    pen = SamplingParams(0.9, 0.9, 40, 1.3, presence_penalty=0.4, frequency_penalty=0.3)
    want_a, want_b = solo(model, PROMPTS[0], 30, pen, seed=3), solo(model, PROMPTS[2], 30, pen, seed=4)
    a, b = submit(scheduler, PROMPTS[0], 30, pen, seed=3), submit(scheduler, PROMPTS[2], 30, pen, seed=4)
    got_a = [next(a) for _ in range(16)]  # b is unread meanwhile: MAX_AHEAD tokens, then it sits out
    got_b = []
    reader = threading.Thread(target=lambda: got_b.extend(b))
    reader.start()
    got_a += list(a)
    reader.join()
    assert got_a == want_a and got_b == want_b
    assert {1, 2} <= set(scheduler.stats.batch_sizes)


def test_token_times_are_the_engine_steps(model, scheduler):
    a, b = submit(scheduler, PROMPTS[0], 12), submit(scheduler, PROMPTS[1], 12)
    reader = threading.Thread(target=lambda: list(b))
    reader.start()
    list(a)
    reader.join()
    assert len(a.times) == len(b.times) == 12
    assert a.times == sorted(a.times) and b.times == sorted(b.times)
    assert len(set(a.times) & set(b.times)) >= 8, "the rows of one decode step should share its time"
