"""The static decode step of chatglm.graph, run eagerly on CPU: it equals the dynamic cached path,
traces as one graph without host syncs, and generation through it gives the same tokens."""
from __future__ import annotations

import logging

import pytest
import torch

from chatglm.serving import generation as generate
from chatglm.model import graph
from chatglm.model.cache import KVCache, cache_usage
from chatglm.weights.checkpoint import load_model
from chatglm.config import ChatGLMConfig
from chatglm.serving.generation import generate_ids
from chatglm.model.graph import DecoderPool, GraphedDecoder, bucket_capacity, decoder_pool, graphs_enabled, release_decoders
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


def _generate(model, n=12, params=SamplingParams(0.0), seed=None, prompt=PROMPT, **kw):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(generate_ids(model, prompt, n, params, (), model.config.seq_length, gen, **kw))


@pytest.fixture(autouse=True)
def no_leftover_caches():
    before = cache_usage()
    yield
    assert cache_usage().live == before.live, "a test left a KV cache (or a decoder pool) alive"


@pytest.mark.parametrize("variant,steps", [("float", 10), ("int4", 10), ("int4-triton", 3)])
def test_static_step_equals_the_dynamic_cached_path(model_dir, variant, steps):
    model = _load(model_dir, variant)
    decoder = GraphedDecoder(model, 1, 64)
    assert not decoder.graphed
    dynamic = KVCache(model.config, 1, 64, "cpu", model.dtype)
    with torch.inference_mode():
        static = decoder.begin()
        want = model(torch.tensor([PROMPT]), cache=dynamic, last_only=True)[0, -1]
        model(torch.tensor([PROMPT[:5]]), cache=static)  # a chunked prefill into the static cache
        model(torch.tensor([PROMPT[5:]]), cache=static)
        for _ in range(steps):
            token = torch.tensor([[int(want.argmax())]])
            want = model(token, cache=dynamic, last_only=True)[0, -1]
            got = decoder.step(token)
            assert got.shape == (1, model.config.padded_vocab_size) and got.dtype == torch.float32
            assert (got[0] - want).abs().max() <= 1e-5
    assert static.length == dynamic.length == len(PROMPT) + steps
    dynamic.release()
    decoder.release()


def test_static_step_with_a_batch_of_two(model_dir):
    model = _load(model_dir)
    prompts = torch.tensor([PROMPT, list(reversed(PROMPT))])
    decoder = GraphedDecoder(model, 2, 64)
    dynamic = KVCache(model.config, 2, 64, "cpu", model.dtype)
    with torch.inference_mode():
        model(prompts, cache=decoder.begin())
        want = model(prompts, cache=dynamic, last_only=True)[:, -1]
        for _ in range(4):
            tokens = want.argmax(-1, keepdim=True)
            want = model(tokens, cache=dynamic, last_only=True)[:, -1]
            torch.testing.assert_close(decoder.step(tokens), want, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"ids of shape \(2, 1\)"):
            decoder.step(torch.tensor([[1]]))
    dynamic.release()
    decoder.release()


def test_static_step_traces_as_one_graph_without_host_syncs(model_dir):
    """torch.compile(fullgraph=True) fails on .item() or a branch on a tensor value; the traced graph
    must not move data to the host, and a new position must not need a new trace."""
    model = _load(model_dir, "int4")
    decoder = GraphedDecoder(model, 1, 64)
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(model.decode_static, fullgraph=True, backend=backend)
    with torch.inference_mode():
        decoder.begin()
        for position in (3, 4, 40):
            decoder._position.fill_(position)
            want = model.decode_static(decoder._ids, decoder._position, decoder.cache)  # builds RoPE tables first
            torch.testing.assert_close(step(decoder._ids, decoder._position, decoder.cache), want)
    torch._dynamo.reset()
    assert len(graphs) == 1, "the position changed the traced graph"
    host = {"cpu", "item", "tolist", "numpy", "_local_scalar_dense"}
    assert not [n for n in graphs[0].graph.nodes if str(n.target).rpartition(".")[2] in host]
    decoder.release()


@pytest.mark.parametrize("variant", ["float", "int4"])
def test_generation_through_the_static_step_gives_the_default_tokens(model_dir, variant):
    model = _load(model_dir, variant)
    greedy = _generate(model)
    sampled = _generate(model, 16, SamplingParams(0.9, top_p=0.95, top_k=20, repetition_penalty=1.1), seed=4)
    before = cache_usage()
    assert _generate(model, static=True) == greedy
    assert decoder_pool(model).capacities() == [(1, 64)]
    kept = cache_usage()
    assert kept.live == before.live + 1, "the decoder keeps its bucket's cache between requests"
    assert _generate(model, 16, SamplingParams(0.9, top_p=0.95, top_k=20, repetition_penalty=1.1),
                     seed=4, static=True) == sampled
    assert _generate(model, static=True) == greedy, "a reused (reset) decoder gives the same tokens"
    assert cache_usage().allocated == kept.allocated, "the bucket's decoder was reused"
    release_decoders(model)
    assert (cache_usage().live, cache_usage().live_bytes) == (before.live, before.live_bytes)


def test_static_generation_limits_and_chunked_prefill(model_dir, monkeypatch):
    model = _load(model_dir)
    whole = _generate(model, 40)
    assert _generate(model, 5, static=True) == whole[:5]
    assert _generate(model, 100, static=True) == _generate(model, 100)  # clamped to the context
    assert len(_generate(model, 100, static=True)) == 64 - len(PROMPT)
    stop = whole[4]
    stopped = list(generate_ids(model, PROMPT, 12, SamplingParams(0.0), (stop,), 64, static=True))
    assert stopped == whole[:whole.index(stop)]
    assert _generate(model, 3, prompt=[7], static=True) == _generate(model, 3, prompt=[7])
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 5)
    assert _generate(model, 40, static=True) == whole
    release_decoders(model)


def test_a_busy_decoder_is_not_shared(model_dir):
    """Two interleaved generators: the second finds the bucket's decoder busy and decodes over its
    own request-sized cache; both give the tokens they give alone."""
    model = _load(model_dir)
    want = _generate(model)
    first = generate_ids(model, PROMPT, 12, SamplingParams(0.0), (), 64, static=True)
    second = generate_ids(model, PROMPT, 12, SamplingParams(0.0), (), 64, static=True)
    got = [(next(first), next(second)) for _ in range(12)]
    assert [a for a, _ in got] == want and [b for _, b in got] == want
    assert cache_usage().last_capacity == len(PROMPT) + 12
    first.close()
    second.close()
    release_decoders(model)


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
    before = cache_usage()
    for needed in (100, 300, 100, 600):
        pool.give_back(pool.acquire(1, needed))
    assert pool.capacities() == [(1, 256), (1, 1024)]
    assert cache_usage().live == before.live + 2
    busy = pool.acquire(1, 200)
    assert busy.cache.length == 0 and pool.acquire(1, 256) is None, "a busy decoder is not handed out twice"
    other = pool.acquire(1, 2000)
    assert pool.capacities() == [(1, 256), (1, 2048)], "the least recent free bucket was evicted"
    pool.release()
    assert pool.capacities() == [(1, 256), (1, 2048)], "decoders in use are kept"
    pool.give_back(busy)
    pool.give_back(other)
    pool.release()
    assert pool.capacities() == [] and cache_usage().live == before.live


def test_no_capture_is_attempted_on_cpu(model_dir, monkeypatch, caplog):
    attempts = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *a, **k: attempts.append("graph"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: attempts.append("stream"))
    monkeypatch.setenv(graph.ENV_VAR, "1")
    assert not graphs_enabled("cpu") and not graphs_enabled(torch.device("cpu"))
    model = _load(model_dir)
    with caplog.at_level(logging.INFO, logger="chatglm.model.graph"):
        assert _generate(model, 4, static=True) == _generate(model, 4)
        assert GraphedDecoder(model, 1, 64).graphed is False
    assert attempts == [] and not [r for r in caplog.records if r.name.startswith("chatglm")]
    release_decoders(model)


def test_graphs_env_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(graph.ENV_VAR, raising=False)
    assert graphs_enabled("cuda")
    for off in ("0", "false", " OFF "):
        monkeypatch.setenv(graph.ENV_VAR, off)
        assert not graphs_enabled("cuda:0")
    monkeypatch.setenv(graph.ENV_VAR, "1")
    assert graphs_enabled("cuda") and not graphs_enabled("cpu")


def test_failed_capture_is_logged_and_runs_the_same_step_eagerly(model_dir, caplog):
    model = _load(model_dir, "int4")
    with caplog.at_level(logging.WARNING, logger="chatglm.model.graph"):
        forced = GraphedDecoder(model, 1, 64, use_graph=True)  # no CUDA here: the capture fails
    assert not forced.graphed
    assert "CUDA graph capture of the decode step failed" in caplog.text and "Traceback" in caplog.text
    eager = GraphedDecoder(model, 1, 64, use_graph=False)
    with torch.inference_mode():
        for decoder in (forced, eager):
            model(torch.tensor([PROMPT]), cache=decoder.begin())
        for token in (5, 6, 7):
            assert torch.equal(forced.step(torch.tensor([[token]])), eager.step(torch.tensor([[token]])))
        forced.begin()
        with pytest.raises(ValueError, match="KV cache full"):
            for _ in range(65):
                forced.step(torch.tensor([[1]]))
    forced.release()
    eager.release()
