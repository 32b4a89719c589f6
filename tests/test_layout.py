"""The package's shape: no import cycles between modules, dependencies pointing one way, the GPU
acceptance command refusing cleanly without CUDA, and an installable wheel."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["quant", "model", "weights", "text", "serving"]
"""Lower layers first: a module may import its own sub-package and those before it, never after
(``config``/``family`` are leaves anyone may import; ``bench`` and ``gpucheck`` are tools on top)."""
ALLOWED_UP = {("model", "quant"): False, ("quant", "model"): False}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "chatglm").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def test_no_import_cycles_and_layers_point_one_way():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for dep in graph[m]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [m])
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    for m, deps in graph.items():
        here = m.split(".")[1] if m.count(".") else ""
        for dep in deps:
            there = dep.split(".")[1] if dep.count(".") else ""
            if here in rank and there in rank:
                assert rank[there] <= rank[here], f"{m} imports {dep}: {here}/ must not depend on {there}/"
    loader = {d for d in graph["chatglm.weights.checkpoint"] if d.startswith("chatglm.quant")}
    assert not {d for d in loader if "kernels" in d or "dispatch" in d}, "the loader must not import the kernels"


def test_gpucheck_without_cuda_says_so_in_one_line():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check itself would run")
    proc = subprocess.run([sys.executable, "-m", "chatglm.gpucheck"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0]


def test_the_wheel_builds_with_the_package_and_prompts(tmp_path):
    import shutil
    src = tmp_path / "src"  # a copy, so the build's own folders never land in the working tree
    skip = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "build", "*.egg-info", ".cog")
    shutil.copytree(ROOT, src, ignore=lambda d, names: set(skip(d, names)) | ({"weights"} if Path(d) == ROOT else set()))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "chatglm/serving/pipeline.py" in names and "prompts/chatglm3.py" in names
    assert "chatglm/quant/kernels/csrc/int4_gemv.cpp" in names, "the C++ sources ship with the package"
    assert not [n for n in names if n.startswith(("tests/", "weights/"))]


def test_pyproject_lists_every_package():
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("chatglm/**/__init__.py")}
    found |= {"prompts"}
    assert listed == found


def test_chunk_attention_memory_stays_far_below_the_math_kernel():
    proc = subprocess.run([sys.executable, "-m", "chatglm.bench.attention", "--length", "4096", "--chunk", "256"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = {ln.split(",")[-1].split(":")[0].strip(): float(ln.split(":")[-1].split()[0])
                for ln in proc.stdout.splitlines() if "measured on CPU" in ln}
    assert measured["ours"] * 4 < measured["math"], measured
