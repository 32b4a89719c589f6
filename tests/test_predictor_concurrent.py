"""predict.py with several prediction slots, in-process: the slot setting, and both async forms of
``predict`` (cog 0.16.12's async generator, coglet's coroutine returning a generator) on the engine:
concurrent greedy text equal to the single-slot predictor's, a cancel that frees the engine's row, a
bad input that fails only its own prediction. The real servers are in tests/test_cog_concurrency.py."""
from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import predict  # noqa: F401  the single-slot module of the other tests, imported before any test here sets slots
from chatglm.serving.scheduler import CPU_MAX_BATCH, engine_batch
from tests.predict_helpers import predict_defaults, predict_text

pytestmark = pytest.mark.filterwarnings("ignore:current_scope is an experimental")
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["hello", "你好", "tell me a story", "why is the sky blue"]


def load_predict(monkeypatch: pytest.MonkeyPatch, slots: str, coglet: bool = False) -> types.ModuleType:
    """predict.py imported afresh (as its own module) with COG_MAX_CONCURRENCY=slots, as under coglet
    when ``coglet`` (the form is chosen at import, from whether the package ``coglet`` is there)."""
    monkeypatch.setenv("COG_MAX_CONCURRENCY", slots)
    real_find_spec = importlib.util.find_spec
    if coglet:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "coglet" else real_find_spec(name, *a))
    name = f"predict_{slots}_{'coglet' if coglet else 'cog'}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def set_up(module: types.ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CHATGLM_WEIGHTS", str(model_dir))
    monkeypatch.delenv("CHATGLM_FAMILY", raising=False)
    predictor = module.Predictor()
    predictor.setup()
    return predictor


def inputs(**overrides: Any) -> dict[str, Any]:
    args = predict_defaults()
    args.update(overrides)
    return args


def greedy(prompt: str, tokens: int = 40) -> dict[str, Any]:
    return inputs(prompt=prompt, temperature=0.0, max_tokens=tokens, min_tokens=tokens)


@pytest.mark.parametrize("raw", ["0", "-2", "2.5", "four", "3 slots"])
def test_bad_slot_settings_fail_at_import_naming_the_setting(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    with pytest.raises(ValueError, match=rf"COG_MAX_CONCURRENCY must be a whole number >= 1, got {raw!r}"):
        load_predict(monkeypatch, raw)


def test_slots_come_from_cog_yaml_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    module = load_predict(monkeypatch, "3")
    assert module.MAX_CONCURRENCY == 3
    monkeypatch.delenv("COG_MAX_CONCURRENCY")
    shipped = yaml.safe_load((ROOT / "cog.yaml").read_text())["concurrency"]["max"]
    assert module.max_concurrency() == shipped > 1
    monkeypatch.setattr(module, "COG_CONFIG", ROOT / "no-such-cog.yaml")
    assert module.max_concurrency() == 1


def test_engine_batch_is_sized_for_the_device() -> None:
    assert engine_batch(torch.device("cpu"), 8) == CPU_MAX_BATCH == 4
    assert engine_batch(torch.device("cpu"), 2) == 2
    assert engine_batch(torch.device("cuda"), 8) == 8


def test_the_form_of_predict_follows_the_slots_and_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    single = load_predict(monkeypatch, "1")
    assert inspect.isgeneratorfunction(single.Predictor.predict)
    cog016 = load_predict(monkeypatch, "4")
    assert inspect.isasyncgenfunction(cog016.Predictor.predict)
    coglet = load_predict(monkeypatch, "4", coglet=True)
    assert inspect.iscoroutinefunction(coglet.Predictor.predict)
    for module in (single, cog016, coglet):  # the inputs every runtime reads stay the method's own
        assert list(inspect.signature(module.Predictor.predict).parameters) == ["self", *predict_defaults()]


@pytest.fixture(scope="module")
def solo_texts(predictor2: Any) -> dict[str, str]:
    """The single-slot predictor's greedy text for each prompt."""
    return {p: predict_text(predictor2, **greedy(p)) for p in PROMPTS}


async def collect_async(predictor: Any, args: dict[str, Any]) -> str:
    return "".join([chunk async for chunk in predictor.predict(**args)])


async def collect_coglet(predictor: Any, args: dict[str, Any]) -> str:
    chunks = await predictor.predict(**args)
    return await asyncio.to_thread(lambda: "".join(chunks))  # coglet iterates on a thread of its own


@pytest.mark.parametrize("coglet", [False, True], ids=["cog-0.16-form", "coglet-form"])
def test_concurrent_predictions_equal_single_slot_ones(monkeypatch: pytest.MonkeyPatch, chatglm2_dir: Path,
                                                       solo_texts: dict[str, str], coglet: bool) -> None:
    module = load_predict(monkeypatch, "4", coglet=coglet)
    predictor = set_up(module, chatglm2_dir, monkeypatch)
    collect = collect_coglet if coglet else collect_async

    async def main() -> list[str]:
        return await asyncio.gather(*(collect(predictor, greedy(p)) for p in PROMPTS))

    try:
        assert asyncio.run(main()) == [solo_texts[p] for p in PROMPTS]
        assert predictor.pipe.scheduler.stats.batch_sizes[4] > 0, "the four predictions never shared a step"
        assert predictor.pipe.scheduler.load() == (0, 0)
    finally:
        predictor.pipe.scheduler.close()


def test_cancel_frees_the_engine_row_and_a_bad_input_fails_alone(monkeypatch: pytest.MonkeyPatch, chatglm2_dir: Path,
                                                                 solo_texts: dict[str, str],
                                                                 capsys: pytest.CaptureFixture) -> None:
    module = load_predict(monkeypatch, "4")
    predictor = set_up(module, chatglm2_dir, monkeypatch)
    scheduler = predictor.pipe.scheduler

    async def cancelled() -> None:
        task = asyncio.ensure_future(collect_async(predictor, greedy("hello", 30000)))
        while scheduler.stats.rows < 20:  # it is decoding
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while scheduler.load() != (0, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def bad() -> None:
        with pytest.raises(ValueError, match="prompt"):
            await collect_async(predictor, inputs(prompt=""))

    async def main() -> list[Any]:
        return await asyncio.gather(cancelled(), bad(), collect_async(predictor, greedy("你好")))

    try:
        _, _, text = asyncio.run(main())
        assert text == solo_texts["你好"]
        assert scheduler.load() == (0, 0)
        assert scheduler.stats.cancelled == 1
        out = capsys.readouterr().out
        assert "stop: cancelled" in out and "stop: failed (InputError: prompt" in out
    finally:
        scheduler.close()


def test_each_step_of_the_coglet_form_runs_in_the_predictions_context(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_predict(monkeypatch, "2", coglet=True)
    prediction_id: contextvars.ContextVar[str] = contextvars.ContextVar("prediction_id", default="none")

    class Steps:
        closed_in = None

        def __iter__(self):
            return self

        def __next__(self) -> str:
            if len(seen) == 3:
                raise StopIteration
            seen.append(prediction_id.get())
            return "x"

        def close(self) -> None:
            Steps.closed_in = prediction_id.get()

    seen: list[str] = []
    prediction_id.set("p1")
    chunks = module._in_context(contextvars.copy_context(), Steps())
    prediction_id.set("other")
    assert list(chunks) == ["x"] * 3 and seen == ["p1"] * 3 and Steps.closed_in == "p1"


def test_every_slot_busy_with_more_than_the_engine_decodes_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                   chatglm2_dir: Path, solo_texts: dict[str, str]) -> None:
    # 8 slots, 4 rows at a time on CPU: the 4 waiting predictions block their reader threads until
    # the engine takes them, which must not keep the 4 running ones from being read.
    module = load_predict(monkeypatch, "8")
    predictor = set_up(module, chatglm2_dir, monkeypatch)
    prompts = PROMPTS * 2

    async def main() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(*(collect_async(predictor, greedy(p)) for p in prompts)), 60)

    try:
        assert asyncio.run(main()) == [solo_texts[p] for p in prompts]
        assert predictor.pipe.scheduler.max_batch == 4 and predictor.pipe.scheduler.load() == (0, 0)
    finally:
        predictor.pipe.scheduler.close()


def test_text_stream_cancel_from_another_thread_without_the_engine(predictor2: Any) -> None:
    import threading

    from chatglm import GenerationStats

    pipe = predictor2.pipe
    assert pipe.scheduler is None
    stats = GenerationStats()
    chunks = pipe.stream([{"role": "user", "content": "hello"}], max_new_tokens=300, temperature=0.0,
                         min_tokens=300, stats=stats)
    next(chunks)
    canceller = threading.Thread(target=chunks.cancel)
    canceller.start()
    canceller.join()
    list(chunks)
    assert stats.output_tokens < 300 and stats.stop_reason == ""
