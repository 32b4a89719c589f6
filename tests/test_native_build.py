"""The C++ extension's build name is its own per source, checkout, torch installation and ninja: two
environments (the test venv and the coglet venv) sharing one name rebuilt it over each other."""
from __future__ import annotations

import pytest
import torch

from chatglm.quant.kernels import native


def test_build_name_depends_on_sources_checkout_and_torch_location(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path) -> None:
    name = native._build_name()
    assert name == native._build_name() and name.startswith("chatglm_kernels_")
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    other_torch = native._build_name()
    monkeypatch.undo()
    copy = tmp_path / "csrc"
    copy.mkdir()
    for f in native.SOURCES + native.HEADERS:
        (copy / f).write_bytes((native.CSRC / f).read_bytes())
    monkeypatch.setattr(native, "CSRC", copy)
    other_checkout = native._build_name()
    (copy / native.SOURCES[0]).write_bytes((copy / native.SOURCES[0]).read_bytes() + b"\n")
    changed_source = native._build_name()
    monkeypatch.setattr(native.shutil, "which", lambda cmd: f"/elsewhere/bin/{cmd}")
    other_ninja = native._build_name()
    assert len({name, other_torch, other_checkout, changed_source, other_ninja}) == 5
