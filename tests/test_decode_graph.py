"""The decode steps of chatglm.model.decoder, run eagerly on CPU: they equal the plain forward,
traces as one graph without host syncs, and generation through it gives the same tokens."""
from __future__ import annotations

import logging

import pytest
import torch

from chatglm.model import decoder as graph
from chatglm.serving import generation as generate
from chatglm.model.cache import KVCache, cache_usage
from chatglm.weights.checkpoint import load_model
from chatglm.config import ChatGLMConfig
from chatglm.serving.generation import generate_ids
from chatglm.model.decoder import DecodeStep, DecoderPool, bucket_capacity, graphs_enabled
from chatglm.model.transformer import ChatGLMForConditionalGeneration
from chatglm.serving.sampling import SamplingParams
from tests.tiny import random_state, tiny_config, write_model

PROMPT = [64790, 64792, 36474, 54591, 31123, 13, 30910, 100, 2000, 3, 77, 5000]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(rope_ratio=50, seq_length=64)
    return write_model(tmp_path_factory.mktemp("tiny-graph"), cfg, random_state(cfg, seed=7), "safetensors")


def _load(model_dir, variant: str = "float") -> ChatGLMForConditionalGeneration:
    model = load_model(model_dir, ChatGLMConfig.from_json(model_dir / "config.json"),
                       quantize=None if variant == "float" else 4)
    if variant == "int4-triton":
        from chatglm.quant.kernels import triton_int4
        from chatglm.quant.dispatch import prepare_model
        if not triton_int4.is_available():
            pytest.skip("Triton (or its CPU interpreter) is not available")
        assert prepare_model(model, "triton") == "triton"
    return model


def _pos(values) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1)


def _generate(model, n=12, params=SamplingParams(0.0), seed=None, prompt=PROMPT, **kw):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(generate_ids(model, prompt, n, params, (), model.config.seq_length, gen, **kw))


@pytest.fixture(autouse=True)
def no_leftover_caches():
    before = cache_usage()
    yield
    assert cache_usage().live == before.live, "a test left a KV cache (or a decoder pool) alive"


@pytest.mark.parametrize("variant,steps", [("float", 10), ("int4", 10), ("int4-triton", 3)])
def test_decode_steps_equal_the_plain_forward(model_dir, variant, steps):
    model = _load(model_dir, variant)
    step = DecodeStep(model, 1, 64)
    assert not step.graphed
    ids = list(PROMPT)
    with torch.inference_mode():
        step.prefill(PROMPT[:5], 0, 0)  # a chunked prefill into the step's cache
        got = step.prefill(PROMPT[5:], 0, 5)
        for i in range(steps):
            want = model(torch.tensor([ids]))[0, -1]
            assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
            ids.append(int(want.argmax()))
            got = step.step(torch.tensor([[ids[-1]]]), _pos([len(ids) - 1]), span=len(ids) if i % 2 else None)[0]
            assert got.dtype == torch.float32 and got.shape == (model.config.padded_vocab_size,)
    step.release()


def test_a_batch_step_with_rows_at_different_lengths(model_dir):
    model = _load(model_dir)
    prompts = [PROMPT, list(reversed(PROMPT))[:7]]
    step = DecodeStep(model, 2, 64)
    with torch.inference_mode():
        last = torch.stack([step.prefill(p, row) for row, p in enumerate(prompts)])
        seqs = [list(p) for p in prompts]
        for _ in range(4):
            tokens = last.argmax(-1, keepdim=True)
            for seq, t in zip(seqs, tokens[:, 0].tolist()):
                seq.append(t)
            last = step.step(tokens, _pos([len(s) - 1 for s in seqs]))
            want = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
            torch.testing.assert_close(last, want, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="outside the cache's 2 rows"):
            step.prefill([1], row=2)
    step.release()


def test_the_one_token_step_traces_as_one_graph_without_host_syncs(model_dir):
    """torch.compile(fullgraph=True) fails on .item() or a branch on a tensor value; the traced graph
    must not move data to the host, and a new position must not need a new trace."""
    model = _load(model_dir, "int4")
    step = DecodeStep(model, 1, 64)
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.inference_mode():
        for position in (3, 4, 40):
            pos = _pos([position])
            want = model(step.ids, pos, step.cache)
            torch.testing.assert_close(compiled(step.ids, pos, step.cache), want)
    torch._dynamo.reset()
    assert len(graphs) == 1, "the position changed the traced graph"
    host = {"cpu", "item", "tolist", "numpy", "_local_scalar_dense"}
    assert not [n for n in graphs[0].graph.nodes if str(n.target).rpartition(".")[2] in host]
    step.release()


@pytest.mark.parametrize("variant", ["float", "int4"])
def test_a_kept_bucket_gives_the_same_tokens_request_after_request(model_dir, variant):
    model = _load(model_dir, variant)
    greedy = _generate(model)
    params = SamplingParams(0.9, top_p=0.95, top_k=20, repetition_penalty=1.1)
    sampled = _generate(model, 16, params, seed=4)
    pool = DecoderPool(model)
    pool.bucketed = True  # the CUDA policy, run eagerly here
    before = cache_usage()
    assert _generate(model, decoders=pool) == greedy
    assert pool.kept() == [(1, 64)]
    kept = cache_usage()
    assert kept.live == before.live + 1, "the pool keeps its bucket's cache between requests"
    assert _generate(model, 16, params, seed=4, decoders=pool) == sampled
    assert _generate(model, decoders=pool) == greedy, "a reused bucket (stale keys beyond) gives the same tokens"
    assert cache_usage().allocated == kept.allocated, "the bucket was reused"
    pool.release()
    assert (cache_usage().live, cache_usage().live_bytes) == (before.live, before.live_bytes)


def test_cpu_requests_get_a_cache_of_exactly_their_size_freed_at_the_end(model_dir, monkeypatch):
    model = _load(model_dir)
    pool = DecoderPool(model)
    whole = _generate(model, 40)
    before = cache_usage()
    assert _generate(model, 5, decoders=pool) == whole[:5]
    assert cache_usage().last_capacity == len(PROMPT) + 5 and cache_usage().live == before.live
    assert len(_generate(model, 100, decoders=pool)) == 64 - len(PROMPT)  # clamped to the context
    stop = whole[4]
    assert list(generate_ids(model, PROMPT, 12, SamplingParams(0.0), (stop,), 64, decoders=pool)) == \
        whole[:whole.index(stop)]
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 5)
    assert _generate(model, 40, decoders=pool) == whole
    assert pool.kept() == []


def test_a_busy_bucket_is_not_shared(model_dir):
    """Two interleaved generators: the second finds the bucket busy and gets a step of its own;
    both give the tokens they give alone, and the extra step is freed."""
    model = _load(model_dir)
    want = _generate(model)
    pool = DecoderPool(model)
    pool.bucketed = True
    first = generate_ids(model, PROMPT, 12, SamplingParams(0.0), (), 64, decoders=pool)
    second = generate_ids(model, PROMPT, 12, SamplingParams(0.0), (), 64, decoders=pool)
    got = [(next(first), next(second)) for _ in range(12)]
    assert [a for a, _ in got] == want and [b for _, b in got] == want
    first.close()
    second.close()
    assert pool.kept() == [(1, 64)]
    pool.release()


def test_bucket_capacity():
    assert [bucket_capacity(n, 32768) for n in (1, 255, 256, 257, 1000, 1025)] == [256, 256, 256, 512, 1024, 2048]
    assert bucket_capacity(20000, 32768) == 32768
    assert bucket_capacity(5000, 8192) == 8192
    assert bucket_capacity(100, 64) == 100  # never below what is needed
    assert bucket_capacity(30, 64) == 64  # at most the context otherwise
    with pytest.raises(ValueError):
        bucket_capacity(0, 64)


def test_pool_keeps_the_two_most_recent_buckets():
    model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(tiny_config(seq_length=2048)))
    pool = DecoderPool(model)
    pool.bucketed = True
    before = cache_usage()
    for needed in (100, 300, 100, 600):
        pool.give_back(pool.acquire(needed))
    assert pool.kept() == [(1, 256), (1, 1024)]
    assert cache_usage().live == before.live + 2
    busy = pool.acquire(200)
    spare = pool.acquire(256)
    assert spare is not busy and spare.capacity == 256, "a busy step is not handed out twice"
    pool.give_back(spare)
    assert cache_usage().live == before.live + 2, "the spare step is freed when given back"
    other = pool.acquire(2000)
    assert pool.kept() == [(1, 256), (1, 2048)], "the least recent free bucket was evicted"
    pool.release()
    assert pool.kept() == [(1, 256), (1, 2048)], "steps in use are kept"
    pool.give_back(busy)
    pool.give_back(other)
    pool.release()
    assert pool.kept() == [] and cache_usage().live == before.live


def test_no_capture_is_attempted_on_cpu(model_dir, monkeypatch, caplog):
    attempts = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *a, **k: attempts.append("graph"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: attempts.append("stream"))
    monkeypatch.setenv(graph.ENV_VAR, "1")
    assert not graphs_enabled("cpu") and not graphs_enabled(torch.device("cpu"))
    model = _load(model_dir)
    pool = DecoderPool(model)
    with caplog.at_level(logging.INFO, logger="chatglm.model.decoder"):
        assert _generate(model, 4, decoders=pool) == _generate(model, 4)
    assert attempts == [] and not [r for r in caplog.records if r.name.startswith("chatglm")]


def test_graphs_env_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(graph.ENV_VAR, raising=False)
    assert graphs_enabled("cuda")
    for off in ("0", "false", " OFF "):
        monkeypatch.setenv(graph.ENV_VAR, off)
        assert not graphs_enabled("cuda:0")
    monkeypatch.setenv(graph.ENV_VAR, "1")
    assert graphs_enabled("cuda") and not graphs_enabled("cpu")


def test_a_failed_capture_is_logged_once_and_the_bucket_runs_eagerly(model_dir, monkeypatch, caplog):
    """Injected: the capture raises. The pool logs it once for the bucket, never retries it, and the
    eager step gives the tokens of the plain path."""
    model = _load(model_dir, "int4")
    want = _generate(model)
    calls = []

    def failing_stream(*_a, **_k):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing (injected)")

    monkeypatch.setattr(torch.cuda, "Stream", failing_stream)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    pool = DecoderPool(model, use_graphs=True)
    pool.bucketed = True
    with caplog.at_level(logging.WARNING, logger="chatglm.model.decoder"):
        for _ in range(3):
            assert _generate(model, decoders=pool) == want
    warnings = [r for r in caplog.records if "capture of the decode step failed" in r.getMessage()]
    assert len(warnings) == 1 and "injected" in warnings[0].getMessage() and len(calls) == 1
    pool.release()


def test_warmup_prepares_the_default_bucket(model_dir):
    model = _load(model_dir)
    pool = DecoderPool(model)
    pool.bucketed = True
    step = pool.warmup(40)
    assert pool.kept() == [(1, 64)] and not step.in_use
    assert _generate(model, decoders=pool) == _generate(model)
    pool.release()
