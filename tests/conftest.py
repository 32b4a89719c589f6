"""Shared test fixtures: paths into ../shared (skipped with a reason when it is absent)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# predict.py picks its form from the number of prediction slots when imported: the tests import it
# with one slot (as the single-prediction tests expect) unless they ask for more
# (tests/test_cog_concurrency.py; tests/cogserver.py sets it for each server it starts).
os.environ["COG_MAX_CONCURRENCY"] = "1"
import torch

if not torch.cuda.is_available():
    # Triton fixes its mode when triton.language is first imported (anything may import it), so the
    # CPU interpreter that checks the GPU kernels is switched on before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
TOKENIZER_MODEL = SHARED / "chatglm-tokenizer" / "tokenizer.model"

needs_shared = pytest.mark.skipif(
    not TOKENIZER_MODEL.is_file() or not FIXTURES.is_dir(),
    reason="../shared (fixtures and the real tokenizer.model) is not beside the project root; "
    "it is present in CI, absent in a fresh clone",
)


def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    if not TOKENIZER_MODEL.is_file():
        pytest.skip(f"{TOKENIZER_MODEL} not found: ../shared is absent (fresh clone)")
    return TOKENIZER_MODEL


def copy_fixture_model(name: str, dest: Path) -> Path:
    """Copy ../shared/fixtures/models/NAME/model plus the real tokenizer.model into ``dest``,
    giving the layout of an official download (config.json, weights, tokenizer.model)."""
    src = FIXTURES / "models" / name / "model"
    if not src.is_dir() or not TOKENIZER_MODEL.is_file():
        pytest.skip(f"{src} or {TOKENIZER_MODEL} not found: ../shared is absent (fresh clone)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, dest / f.name)
    shutil.copyfile(TOKENIZER_MODEL, dest / "tokenizer.model")
    return dest


@pytest.fixture(scope="session")
def chatglm2_dir(tmp_path_factory) -> Path:
    """The tiny int4 ChatGLM2 fixture model with tokenizer.model beside it."""
    return copy_fixture_model("chatglm2-int4-tiny", tmp_path_factory.mktemp("chatglm2-int4-tiny"))


@pytest.fixture(scope="session")
def chatglm3_dir(tmp_path_factory) -> Path:
    """The tiny sharded fp16 ChatGLM3-32K fixture model with tokenizer.model beside it."""
    return copy_fixture_model("chatglm3-32k-tiny", tmp_path_factory.mktemp("chatglm3-32k-tiny"))


@pytest.fixture(scope="module")
def predictor2(chatglm2_dir: Path):
    """A set-up Predictor on the tiny ChatGLM2 fixture."""
    from tests.predict_helpers import make_predictor
    return make_predictor(chatglm2_dir)


@pytest.fixture(scope="module")
def predictor3(chatglm3_dir: Path):
    """A set-up Predictor on the tiny ChatGLM3-32K fixture."""
    from tests.predict_helpers import make_predictor
    return make_predictor(chatglm3_dir)


@pytest.fixture(scope="module")
def webhooks():
    """A webhook receiver on 127.0.0.1 for async predictions."""
    from tests.cogserver import WebhookReceiver
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()
