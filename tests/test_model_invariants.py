"""Invariants on tiny random models made here: cache, batching, int4 format, dtypes, sampling."""
from __future__ import annotations

import pytest
import torch

from chatglm.weights.checkpoint import load_model
from chatglm.config import ChatGLMConfig
from chatglm.serving.generation import ContextLengthError, generate_ids
from chatglm.model.transformer import ChatGLMForConditionalGeneration
from chatglm.quant.linear import quantize_module
from chatglm.quant.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from chatglm.model.cache import KVCache
from chatglm.serving.sampling import SamplingParams
from tests.tiny import random_state, tiny_config, write_model

PROMPT = [64790, 64792, 36474, 54591, 31123, 13, 30910, 100, 2000, 3, 77, 5000]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(rope_ratio=50, seq_length=64)
    return write_model(tmp_path_factory.mktemp("tiny"), cfg, random_state(cfg, seed=7), "safetensors")


def _load(model_dir, **kw) -> ChatGLMForConditionalGeneration:
    return load_model(model_dir, ChatGLMConfig.from_json(model_dir / "config.json"), **kw)


def _greedy(model, prompt, n=12, **kw):
    return list(generate_ids(model, prompt, n, SamplingParams(0.0), (), model.config.seq_length, **kw))


@pytest.mark.parametrize("quantize", [None, 4], ids=["float", "int4"])
def test_cached_decoding_equals_full_forward(model_dir, quantize):
    model = _load(model_dir, quantize=quantize)
    cached = _greedy(model, PROMPT)
    ids = list(PROMPT)
    with torch.inference_mode():
        for _ in range(len(cached)):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(PROMPT):]
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0, len(PROMPT) - 1:-1]
        cache = KVCache(model.config, 1, len(ids), "cpu", model.dtype)
        model(torch.tensor([PROMPT[:5]]), _pos(0, 5), cache)
        model(torch.tensor([PROMPT[5:]]), _pos(5, len(PROMPT)), cache)  # a chunk continues the cache
        steps = [model(torch.tensor([[t]]), _pos(p, p + 1), cache)[0, -1]
                 for p, t in enumerate(ids[len(PROMPT):-1], start=len(PROMPT))]
    torch.testing.assert_close(torch.stack(steps), full[1:], atol=1e-4, rtol=1e-4)


def _pos(start: int, end: int, rows: int = 1) -> torch.Tensor:
    return torch.arange(start, end).expand(rows, end - start)


def test_rows_at_different_positions_decode_together_as_each_alone(model_dir):
    """The batched one-token step: each row writes and attends at its own position."""
    model = _load(model_dir)
    prompts = [PROMPT, PROMPT[:7], list(reversed(PROMPT))[:10]]
    cache = KVCache(model.config, len(prompts), 40, "cpu", model.dtype)
    alone = []
    with torch.inference_mode():
        for row, p in enumerate(prompts):  # prefill each row of the batch cache on its own
            model(torch.tensor([p]), _pos(0, len(p)), cache.rows(row, 1))
        nxt = torch.tensor([[3], [4], [5]])
        pos = torch.tensor([[len(p)] for p in prompts])
        both = model(nxt, pos, cache)[:, -1]
        again = model(nxt + 10, pos + 1, cache)[:, -1]
        for p, t in zip(prompts, nxt[:, 0].tolist()):
            alone.append(model(torch.tensor([p + [t, t + 10]]))[0, -2:])
    torch.testing.assert_close(both, torch.stack([a[0] for a in alone]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, torch.stack([a[1] for a in alone]), atol=1e-5, rtol=1e-5)


def test_forward_refuses_inconsistent_positions(model_dir):
    model = _load(model_dir)
    cache = KVCache(model.config, 2, 16, "cpu", model.dtype)
    with pytest.raises(ValueError, match="needs input_pos"):
        model(torch.tensor([[1, 2], [3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="same contiguous positions"):
        model(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 1], [1, 2]]), cache)
    with pytest.raises(ValueError, match="within the cache capacity 16"):
        model(torch.tensor([[1, 2]] * 2), _pos(15, 17, 2), cache)
    with pytest.raises(ValueError, match="holds 2 rows"):
        model(torch.tensor([[1]]), torch.tensor([[0]]), cache)


def test_batch_of_two_equals_each_alone(model_dir):
    model = _load(model_dir)
    a, b = PROMPT, list(reversed(PROMPT))
    with torch.inference_mode():
        both = model(torch.tensor([a, b]))
        torch.testing.assert_close(both[0], model(torch.tensor([a]))[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[1], model(torch.tensor([b]))[0], atol=1e-5, rtol=1e-5)


def test_bfloat16_and_float16_stay_close_to_float32(model_dir):
    ref = _load(model_dir)(torch.tensor([PROMPT]))
    for dtype in (torch.bfloat16, torch.float16):
        got = _load(model_dir, dtype=dtype)(torch.tensor([PROMPT]))
        assert got.dtype == torch.float32
        rel = (got - ref).norm() / ref.norm()
        assert rel < 0.05, (dtype, float(rel))


def test_int4_is_close_to_float(model_dir):
    ref = _load(model_dir)(torch.tensor([PROMPT]))
    got = _load(model_dir, quantize=4)(torch.tensor([PROMPT]))
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert 0.9 < cos < 1.0, float(cos)  # 4-bit codes on a 32-wide toy model: close, never identical
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 256, generator=g), torch.randn(64, 256, generator=g)
    packed, scale = quantize_int4(w)
    layer_rel = (x @ dequantize_int4(packed, scale).T - x @ w.T).norm() / (x @ w.T).norm()
    assert layer_rel < 0.2, float(layer_rel)  # theory for gaussian rows: (absmax/7)/sqrt(12) ~ 0.14
    model = quantize_module(_load(model_dir))
    torch.testing.assert_close(model(torch.tensor([PROMPT])), got)


def test_int4_nibble_order_matches_the_official_layout():
    codes = torch.tensor([[1, -1, -8, 7], [0, 3, -7, -2]], dtype=torch.int8)
    packed = pack_int4(codes)
    # high nibble = even input column, low nibble = odd column, two's complement
    assert packed.view(torch.uint8).tolist() == [[0x1F, 0x87], [0x03, 0x9E]]
    assert torch.equal(unpack_int4(packed), codes)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


def test_quantize_follows_the_official_formula():
    w = torch.randn(16, 32, dtype=torch.float16)
    packed, scale = quantize_int4(w)
    assert scale.dtype == torch.float16 and packed.shape == (16, 16)
    torch.testing.assert_close(scale, (w.abs().amax(1) / 7).half())
    assert unpack_int4(packed).abs().max() <= 7
    err = (dequantize_int4(packed, scale) - w.float()).abs()
    assert torch.all(err <= scale.float()[:, None] / 2 + 1e-3)


def test_seeded_sampling_is_reproducible_and_seeds_differ(model_dir):
    model = _load(model_dir)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=0)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return list(generate_ids(model, PROMPT, 16, params, (), 64, g))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_one_equals_greedy(model_dir):
    model = _load(model_dir)
    params = SamplingParams(temperature=0.7, top_k=1, top_p=1.0)
    sampled = list(generate_ids(model, PROMPT, 12, params, (), 64, torch.Generator().manual_seed(3)))
    assert sampled == _greedy(model, PROMPT)


def test_stop_ids_end_generation_and_are_not_yielded(model_dir):
    model = _load(model_dir)
    free = _greedy(model, PROMPT)
    stop = free[4]
    first = free.index(stop)
    assert list(generate_ids(model, PROMPT, 12, SamplingParams(0.0), (stop,), 64)) == free[:first]


def test_max_new_tokens_and_context_limits(model_dir):
    model = _load(model_dir)
    assert len(_greedy(model, PROMPT, n=5)) == 5
    assert len(_greedy(model, PROMPT, n=100)) == 64 - len(PROMPT)  # clamped to what the context leaves
    with pytest.raises(ContextLengthError, match="70 tokens but the context holds 64"):
        _greedy(model, [5] * 70)


def test_chunked_prefill_equals_one_pass(model_dir, monkeypatch):
    from chatglm.serving import generation as generate

    model = _load(model_dir)
    whole = _greedy(model, PROMPT)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 5)  # 12-token prompt: chunks of 5, 5 and 2
    assert _greedy(model, PROMPT) == whole


def test_fast_int4_backend_stays_close_to_the_reference(tmp_path):
    from chatglm.quant.kernels import cpu_int4
    from chatglm.quant.dispatch import prepare_model

    if not cpu_int4.is_available():
        pytest.skip("torch's CPU int4 kernel is not available on this machine")
    cfg = tiny_config(rope_ratio=50, seq_length=128)  # room for a 72-token prompt
    model_dir = write_model(tmp_path, cfg, random_state(cfg, seed=7), "safetensors")
    ref = _load(model_dir, quantize=4)  # float32: the reference dequantize-then-matmul backend
    assert prepare_model(ref, "reference") == "reference"
    fast = _load(model_dir, quantize=4, dtype=torch.bfloat16)
    slow = _load(model_dir, quantize=4, dtype=torch.bfloat16)
    assert prepare_model(fast, "cpu-int4") == "cpu-int4" and prepare_model(slow, "reference") == "reference"
    ids = torch.tensor([PROMPT * 6])  # 72 rows: the prefill (int8 GEMM) path; decode steps use the kernel
    with torch.inference_mode():
        want, got, bf16_ref = ref(ids), fast(ids), slow(ids)
    assert (got - want).norm() / want.norm() < 0.03
    assert (got - want).norm() <= 2 * (bf16_ref - want).norm() + 1e-3  # no worse than bf16 itself
    assert _greedy(fast, PROMPT) == _greedy(slow, PROMPT)


def test_a_suspended_generation_leaves_the_caller_outside_inference_mode(model_dir):
    model = load_model(model_dir, ChatGLMConfig.from_json(model_dir / "config.json"))
    gen = generate_ids(model, [5, 6, 7], 4, SamplingParams(), stop_ids=(), max_context=64)
    next(gen)
    assert not torch.is_inference_mode_enabled()
    gen.close()
