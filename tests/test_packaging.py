"""The install files agree: the CUDA 12.6 requirements are the CUDA 13 ones but for torch, and the
README's setup command and CI both make the two environments the server tests use."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_the_cuda_12_6_requirements_differ_only_in_torch() -> None:
    main, cu126 = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-cu126.txt")
    assert cu126.pop("torch") == main.pop("torch") + "+cu126"
    assert cu126 == main


def test_readme_and_ci_install_both_runtimes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    setup = "python3.11 -m venv .venv-coglet && .venv-coglet/bin/pip install -r requirements-coglet.txt"
    assert setup in readme
    assert "python3.11 -m venv .venv-coglet" in ci and ".venv-coglet/bin/pip install -q -r requirements-coglet.txt" in ci
    assert "cog==0.23.1" in (ROOT / "requirements-coglet.txt").read_text(encoding="utf-8")
