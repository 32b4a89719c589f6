"""``chatglm.download`` against a fake Hugging Face Hub on 127.0.0.1 (tests/hubserver.py): only the
network is replaced. Also the ``python -m chatglm.convert`` and ``python -m chatglm`` commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tests.conftest import ROOT, TOKENIZER_MODEL
from tests.hubserver import FakeHub, FakeRepo, repo_from_dir
from tests.predict_helpers import PROXY_VARS

INT4_REPO = "THUDM/chatglm2-6b-int4"
FP16_REPO = "THUDM/chatglm3-6b"
HELLO = [{"role": "user", "content": "你好"}]
EXTRA_FILES = {"README.md": b"# not a model file\n", "quantization.py": b"raise SystemExit('never run')\n",
               ".gitattributes": b"*.bin filter=lfs\n"}
SUBPROCESS_TIMEOUT = 180


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in PROXY_VARS and not k.startswith(("HF_", "HUGGING")) and k != "CHATGLM_WEIGHTS"}
    env.update(extra)
    return env


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A fake Hub, with huggingface_hub pointed at it (endpoint, cache and token paths in a temp dir)."""
    import huggingface_hub
    from huggingface_hub import constants

    for var in PROXY_VARS + ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    home = str(tmp_path_factory.mktemp("hf-home"))
    with FakeHub() as server:
        real_home = constants.HF_HOME
        for name in dir(constants):
            value = getattr(constants, name)
            if name.isupper() and isinstance(value, str) and value.startswith(real_home):
                monkeypatch.setattr(constants, name, home + value[len(real_home):])
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(home, "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        huggingface_hub.close_session()
        try:
            yield server
        finally:
            huggingface_hub.close_session()


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fp16 ChatGLM3 model made by tests/tiny.py, sharded .bin files like the official one."""
    from tests.tiny import random_state, tiny_config, write_model

    if not TOKENIZER_MODEL.is_file():
        pytest.skip(f"{TOKENIZER_MODEL} not found")
    cfg = tiny_config(_name_or_path="THUDM/chatglm3-6b")
    return write_model(tmp_path_factory.mktemp("chatglm3-fp16") / "model", cfg, random_state(cfg, seed=7),
                       fmt="bin-sharded", tokenizer_model=TOKENIZER_MODEL)


def _greedy_ids(pipe: Any, n: int = 12) -> list[int]:
    return list(pipe.generate(pipe.build_input_ids(HELLO), max_new_tokens=n, temperature=0.0))


def _assert_same_tensors(bin_file: Path, safetensors_file: Path) -> None:
    """The int4 .bin was rewritten as safetensors with every tensor unchanged (dtype and bytes)."""
    from safetensors.torch import load_file
    want = torch.load(bin_file, weights_only=True)
    got = load_file(str(safetensors_file))
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def _resolve_paths(hub: FakeHub) -> list[str]:
    return [path for method, path in hub.log.snapshot() if "/resolve/" in path]


def test_int4_repo_lands_unconverted(hub: FakeHub, chatglm2_dir: Path, tmp_path: Path) -> None:
    from chatglm import Pipeline
    from chatglm.weights.download import download

    repo = hub.add(repo_from_dir(INT4_REPO, chatglm2_dir, commit_prefix="382cc704", extra_files=EXTRA_FILES))
    out = download(INT4_REPO, tmp_path / "weights")
    assert out == tmp_path / "weights"
    assert sorted(os.listdir(tmp_path)) == ["weights"], "the temporary download folder was left behind"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["DOWNLOAD.json", "model.safetensors"] + [p.name for p in chatglm2_dir.iterdir() if p.name != "pytorch_model.bin"])
    for f in chatglm2_dir.iterdir():
        if f.name == "config.json":
            assert json.loads((out / f.name).read_text()) == json.loads(f.read_text())
        elif f.name != "pytorch_model.bin":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    _assert_same_tensors(chatglm2_dir / "pytorch_model.bin", out / "model.safetensors")
    record = json.loads((out / "DOWNLOAD.json").read_text())
    assert record == {"repo_id": INT4_REPO, "revision": repo.commit, "converted_to_int4": False}
    assert ("GET", f"/api/models/{INT4_REPO}/revision/382cc704") in hub.log.snapshot()
    paths = _resolve_paths(hub)
    assert paths and all(f"/{INT4_REPO}/resolve/{repo.commit}/" in p for p in paths)
    assert not any(p.endswith(tuple(EXTRA_FILES)) for p in paths), "files outside the patterns were fetched"

    got = Pipeline.from_pretrained(out, device="cpu", dtype=torch.float32)
    want = Pipeline.from_pretrained(chatglm2_dir, device="cpu", dtype=torch.float32)
    assert got.format_name == "chatglm2"
    assert _greedy_ids(got) == _greedy_ids(want)


def test_fp16_repo_is_converted_to_int4_once(hub: FakeHub, fp16_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from chatglm import Pipeline
    from chatglm.weights.download import download
    from chatglm.quant.int4 import QUANTIZED_LINEARS

    repo = hub.add(repo_from_dir(FP16_REPO, fp16_dir, extra_files=EXTRA_FILES))
    out = download(FP16_REPO, tmp_path / "weights")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["DOWNLOAD.json", "config.json", "model.safetensors", "tokenizer.model"]
    assert not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_bit"] == 4
    assert config["_name_or_path"] == "THUDM/chatglm3-6b"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        scales = sorted(k for k in keys if k.endswith(".weight_scale"))
        assert len(scales) == len(QUANTIZED_LINEARS) * config["num_layers"]
        for scale in scales:
            assert f.get_tensor(scale[:-len("_scale")]).dtype == torch.int8
            assert f.get_tensor(scale).dtype == torch.float16
        assert f.get_tensor("transformer.output_layer.weight").dtype == torch.float16
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER_MODEL.read_bytes()
    record = json.loads((out / "DOWNLOAD.json").read_text())
    assert record == {"repo_id": FP16_REPO, "revision": repo.commit, "converted_to_int4": True}
    assert ("GET", f"/api/models/{FP16_REPO}/revision/main") in hub.log.snapshot()
    assert all(f"/resolve/{repo.commit}/" in p for p in _resolve_paths(hub))

    converted = Pipeline.from_pretrained(out, device="cpu", dtype=torch.float32)
    original = Pipeline.from_pretrained(fp16_dir, device="cpu", dtype=torch.float32, quantize=4)
    assert converted.format_name == "chatglm3"
    assert _greedy_ids(converted, 16) == _greedy_ids(original, 16)
    ids = torch.tensor([converted.build_input_ids(HELLO)])
    with torch.inference_mode():
        torch.testing.assert_close(converted.model(ids), original.model(ids), atol=1e-5, rtol=0)


def test_keep_fp16_moves_the_files_unconverted(hub: FakeHub, fp16_dir: Path, tmp_path: Path) -> None:
    from chatglm.weights.download import download

    repo = hub.add(repo_from_dir(FP16_REPO, fp16_dir))
    out = download(FP16_REPO, tmp_path / "weights", revision=repo.commit[:10], convert=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(["DOWNLOAD.json"] + [p.name for p in fp16_dir.iterdir()])
    assert "quantization_bit" not in json.loads((out / "config.json").read_text())
    record = json.loads((out / "DOWNLOAD.json").read_text())
    assert record == {"repo_id": FP16_REPO, "revision": repo.commit, "converted_to_int4": False}


def test_second_download_replaces_the_first_models_files(hub: FakeHub, fp16_dir: Path, chatglm2_dir: Path,
                                                         tmp_path: Path) -> None:
    """weights/ holds one model: a download into a folder that already has another model's weights
    (here the fp16 model's converted safetensors) must not leave them behind or mix them in."""
    from huggingface_hub.errors import RevisionNotFoundError

    from chatglm import Pipeline
    from chatglm.weights.download import download

    hub.add(repo_from_dir(FP16_REPO, fp16_dir))
    repo = hub.add(repo_from_dir(INT4_REPO, chatglm2_dir, commit_prefix="382cc704"))
    out = tmp_path / "weights"
    out.mkdir()
    (out / "README.md").write_text("kept\n")
    download(FP16_REPO, out)
    assert (out / "model.safetensors").is_file()
    download(INT4_REPO, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["DOWNLOAD.json", "README.md", "model.safetensors"]
        + [p.name for p in chatglm2_dir.iterdir() if p.name != "pytorch_model.bin"])
    _assert_same_tensors(chatglm2_dir / "pytorch_model.bin", out / "model.safetensors")
    assert json.loads((out / "DOWNLOAD.json").read_text())["revision"] == repo.commit
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RevisionNotFoundError):
        download(FP16_REPO, out, revision="0000000")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a failed download changed weights/"
    got = Pipeline.from_pretrained(out, device="cpu", dtype=torch.float32)
    want = Pipeline.from_pretrained(chatglm2_dir, device="cpu", dtype=torch.float32)
    assert _greedy_ids(got) == _greedy_ids(want)


def test_unknown_repo_without_revision_is_a_clear_error(hub: FakeHub, tmp_path: Path) -> None:
    from chatglm.weights.download import download

    with pytest.raises(ValueError, match="someone/model: no pinned revision; pass --revision") as info:
        download("someone/model", tmp_path / "weights")
    assert INT4_REPO in str(info.value)
    assert not [p for _, p in hub.log.snapshot() if p.startswith("/api/models") or "/resolve/" in p]
    assert not (tmp_path / "weights").exists()


def test_unknown_repo_or_revision_on_the_hub(hub: FakeHub, chatglm2_dir: Path, tmp_path: Path) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from chatglm.weights.download import download

    with pytest.raises(RepositoryNotFoundError):
        download("someone/model", tmp_path / "a", revision="main")
    assert not (tmp_path / "a").exists()
    hub.add(repo_from_dir(INT4_REPO, chatglm2_dir))  # its commit does not start with the pinned 382cc704
    with pytest.raises(RevisionNotFoundError):
        download(INT4_REPO, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_download_command_line(hub: FakeHub, chatglm2_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from chatglm.weights.download import main

    repo: FakeRepo = hub.add(repo_from_dir(INT4_REPO, chatglm2_dir, commit_prefix="382cc704"))
    main([INT4_REPO, "--out", str(tmp_path / "w")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "w")
    assert json.loads((tmp_path / "w" / "DOWNLOAD.json").read_text())["revision"] == repo.commit
    with pytest.raises(SystemExit) as info:
        main(["someone/model", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "no pinned revision; pass --revision" in capsys.readouterr().err


def test_download_subprocess_reads_hf_endpoint(chatglm2_dir: Path, tmp_path: Path) -> None:
    """``python -m chatglm.download`` in a fresh process, pointed at the fake Hub by HF_ENDPOINT."""
    with FakeHub() as server:
        repo = server.add(repo_from_dir(INT4_REPO, chatglm2_dir, commit_prefix="382cc704"))
        env = _clean_env(HF_ENDPOINT=server.endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0",
                         HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
        result = subprocess.run([sys.executable, "-m", "chatglm.download", INT4_REPO, "--out", str(tmp_path / "w")],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "w" / "DOWNLOAD.json").read_text())["revision"] == repo.commit
    _assert_same_tensors(chatglm2_dir / "pytorch_model.bin", tmp_path / "w" / "model.safetensors")


def test_convert_command(fp16_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from chatglm.weights.convert import convert_to_int4

    result = subprocess.run([sys.executable, "-m", "chatglm.weights.convert", str(fp16_dir), str(tmp_path / "cli")],
                            cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "cli")
    convert_to_int4(fp16_dir, tmp_path / "api")
    got, want = load_file(tmp_path / "cli" / "model.safetensors"), load_file(tmp_path / "api" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert json.loads((tmp_path / "cli" / "config.json").read_text()) == \
        json.loads((tmp_path / "api" / "config.json").read_text())
    bad = subprocess.run([sys.executable, "-m", "chatglm.weights.convert", str(fp16_dir), str(fp16_dir)],
                         cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert bad.returncode != 0 and "must differ" in bad.stderr


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_chat_command_prints_the_same_text_as_the_pipeline(family: str, request: pytest.FixtureRequest) -> None:
    from chatglm import Pipeline

    model_dir: Path = request.getfixturevalue(f"{family}_dir")
    result = subprocess.run([sys.executable, "-m", "chatglm", "--weights", str(model_dir), "--temperature", "0",
                             "--max-tokens", "8", "你好"], cwd=ROOT, env=_clean_env(), capture_output=True,
                            text=True, encoding="utf-8", timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = Pipeline.from_pretrained(model_dir, device="auto", quantize=4)
    assert result.stdout == pipe.chat(HELLO, max_new_tokens=8, temperature=0.0) + "\n"
    assert "stop:" in result.stderr


def test_chat_command_input_error_exits_2(chatglm2_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "chatglm", "--weights", str(chatglm2_dir), "--messages", "[{",
                             "--max-tokens", "2"], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                            encoding="utf-8", timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 2
    assert "messages" in result.stderr and "JSON" in result.stderr


def test_download_without_network_is_two_lines_naming_the_hub(tmp_path: Path) -> None:
    """No Hub reachable (here: a closed port on 127.0.0.1): a short message, not a traceback."""
    from tests.cogserver import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    env = _clean_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, "-m", "chatglm.download", INT4_REPO, "--out", str(tmp_path / "w")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"error: cannot reach the Hugging Face Hub at {endpoint} to download {INT4_REPO}")
    assert "Check the network connection" in lines[1] and "by hand" in lines[1]
    assert "Traceback" not in result.stderr


def test_chat_command_setup_error_is_one_message(chatglm2_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    for f in chatglm2_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["num_layers"] = 2.5
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "chatglm", "--weights", str(model), "hi"], cwd=ROOT,
                            env=_clean_env(), capture_output=True, text=True, encoding="utf-8",
                            timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {model / 'config.json'}: num_layers must be a positive integer, got 2.5"
