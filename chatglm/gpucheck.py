"""``python -m chatglm.gpucheck``: the GPU acceptance check, one table in a few minutes.

1. every int4 backend's self-check on the real ChatGLM-6B layer shapes in the GPU's dtype;
2. greedy ids on the tiny fixture models (``../shared/fixtures`` when present, else a tiny random
   model made here) equal across the backends that pass, and between graph and eager decode;
3. peak GPU memory of a 16K-token chunked prefill on a random 6B-shaped int4 model, beside the
   weights and the KV cache;
4. ``python -m chatglm.bench --device cuda`` (short settings): decode against the bandwidth floor.

Without CUDA it exits with status 2 and one line saying so.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "models"
TOKENIZER = ROOT.parent / "shared" / "chatglm-tokenizer" / "tokenizer.model"
SHAPE_6B = {"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
            "multi_query_group_num": 2, "ffn_hidden_size": 13696, "padded_vocab_size": 65024, "seq_length": 32768}


def _row(rows: list[tuple[str, str, str]], check: str, result: str, detail: str = "") -> None:
    rows.append((check, result, detail))
    print(f"{check:<44} {result:<10} {detail}", flush=True)


def check_backends(rows, device: torch.device, dtype: torch.dtype) -> list[str]:
    from .quant.dispatch import BACKENDS, PREFERENCE
    from .quant.selfcheck import check_backend
    from .config import ChatGLMConfig
    from .serving.loading import int4_shapes
    shapes = int4_shapes(ChatGLMConfig(**SHAPE_6B))
    passed = []
    for name in PREFERENCE["cuda"]:
        why = BACKENDS[name].unavailable(device, dtype)
        t0 = time.perf_counter()
        reason = why or check_backend(name, device, dtype, shapes)
        took = time.perf_counter() - t0
        _row(rows, f"self-check {name} ({str(dtype).removeprefix('torch.')}, 6B shapes)",
             "PASS" if reason is None else ("SKIP" if why else "FAIL"), reason or f"{took:.1f} s")
        if reason is None:
            passed.append(name)
    return passed


def _fixture_dirs(tmp: Path) -> list[tuple[str, Path, list | None]]:
    """(name, model dir with tokenizer, expected greedy cases or None)."""
    import shutil
    out = []
    if FIXTURES.is_dir() and TOKENIZER.is_file():
        for d in sorted(FIXTURES.iterdir()):
            dest = tmp / d.name
            shutil.copytree(d / "model", dest)
            shutil.copyfile(TOKENIZER, dest / "tokenizer.model")
            cases = json.loads((d / "expected.json").read_text()).get("generate_cases", [])
            out.append((d.name, dest, cases))
        return out
    from .bench.randomckpt import bench_config, random_int4_state
    from .weights.convert import save_safetensors
    dest = tmp / "tiny-random"
    dest.mkdir()
    raw = bench_config("tiny")
    (dest / "config.json").write_text(json.dumps(raw))
    save_safetensors(random_int4_state(raw), dest / "model.safetensors")
    return [("tiny-random", dest, None)]


def check_greedy(rows, device: torch.device, dtype: torch.dtype, backends: list[str]) -> None:
    from .config import ChatGLMConfig
    from .model.decoder import DecoderPool
    from .serving.generation import generate_ids
    from .serving.loading import load_for_inference
    from .serving.sampling import SamplingParams
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir, cases in _fixture_dirs(Path(tmp)):
            cfg = ChatGLMConfig.from_json(model_dir / "config.json")
            prompts = [c["input_ids"] for c in cases] if cases else [[64790, 64792, 36474, 54591, 31123, 13]]
            runs = {}
            for backend in backends:
                model, _ = load_for_inference(model_dir, cfg, device, dtype, quantize=4, backend=backend)
                for graphs in (True, False):
                    pool = DecoderPool(model, use_graphs=graphs)
                    runs[(backend, graphs)] = [list(generate_ids(model, p, 24, SamplingParams(0.0), (), cfg.seq_length,
                                                                 decoders=pool)) for p in prompts]
                    pool.release()
                del model
            first = next(iter(runs.values()))
            same = all(r == first for r in runs.values())
            detail = f"{len(runs)} runs ({', '.join(backends)} x graph/eager), {len(prompts)} prompts"
            if cases:
                exact = sum(a == c["new_ids"] for a, c in zip(first, cases))
                detail += f"; {exact}/{len(cases)} equal the float32 reference"
            _row(rows, f"greedy ids equal, {name}", "PASS" if same else "FAIL", detail)


def check_prefill_memory(rows, device: torch.device, dtype: torch.dtype, backend: str, tokens: int = 16384) -> None:
    from .config import ChatGLMConfig
    from .model.decoder import DecodeStep
    from .model.transformer import ChatGLMForConditionalGeneration
    from .quant.dispatch import prepare_model
    from .quant.linear import Int4Linear, swap_to_int4
    from .serving.generation import PREFILL_CHUNK
    cfg = ChatGLMConfig(**SHAPE_6B)
    with torch.device("meta"):
        model = swap_to_int4(ChatGLMForConditionalGeneration(cfg))
    model.to_empty(device=device)
    for p in model.parameters():  # the float tensors in the compute dtype; int4 scales stay fp16
        p.data = torch.randn(p.shape, device=device, dtype=dtype) * 0.02
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.weight.random_(-128, 128)
            m.weight_scale.uniform_(1e-3, 2e-2)
    model.requires_grad_(False).eval()
    prepare_model(model, backend)
    torch.cuda.synchronize(device)
    weights = torch.cuda.memory_allocated(device)
    step = DecodeStep(model, 1, tokens + 1)
    cache = step.cache.nbytes
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(100, 60000, (tokens,)).tolist()
    t0 = time.perf_counter()
    for start in range(0, tokens, PREFILL_CHUNK):
        step.prefill(ids[start:start + PREFILL_CHUNK], 0, start)
    torch.cuda.synchronize(device)
    took = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device)
    _row(rows, f"prefill {tokens} tokens, 6B shape ({backend})", "DONE",
         f"peak {peak / 2**30:.2f} GiB = weights {weights / 2**30:.2f} + KV cache {cache / 2**30:.2f} + "
         f"activations {(peak - weights - cache) / 2**30:.2f}; {tokens / took:.0f} tok/s")
    step.release()
    del model
    torch.cuda.empty_cache()


def check_bench(rows, timeout: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "chatglm.bench", "--device", "cuda", "--prompts", "32,512",
               "--decode-tokens", "32", "--baseline-tokens", "0", "--json", str(out)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            _row(rows, "bench --device cuda", "TIMEOUT", f"over {timeout} s")
            return
        if proc.returncode != 0 or not out.is_file():
            last = (proc.stderr or proc.stdout).strip().splitlines()
            _row(rows, "bench --device cuda", "FAIL", last[-1] if last else f"exit {proc.returncode}")
            return
        s = json.loads(out.read_text())["summary"]
        _row(rows, f"bench decode ({s['backend']})", f"{s['decode_pct_of_floor']:.0f} %",
             f"{s['decode_ms_median']:.2f} ms/token vs floor {s['floor_ms']:.2f} ms "
             f"({s['bandwidth_gb_per_s']:.0f} GB/s); TTFT {s['ttft_seconds']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chatglm.gpucheck", description=__doc__.split("\n")[0])
    ap.add_argument("--bench-timeout", type=int, default=180, help="seconds allowed for the benchmark (default 180)")
    ap.add_argument("--skip-bench", action="store_true", help="skip step 4")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m chatglm.gpucheck needs a CUDA GPU (torch.cuda.is_available() is False here)")
        return 2
    from .quant.dispatch import default_dtype
    device = torch.device("cuda")
    dtype = default_dtype(device)
    major, minor = torch.cuda.get_device_capability(device)
    print(f"{torch.cuda.get_device_name(device)} (sm{major}{minor}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, dtype {dtype}")
    rows: list[tuple[str, str, str]] = []
    backends = check_backends(rows, device, dtype)
    check_greedy(rows, device, dtype, backends)
    check_prefill_memory(rows, device, dtype, backends[0])
    if not args.skip_bench:
        check_bench(rows, args.bench_timeout)
    failed = [r for r in rows if r[1] in ("FAIL", "TIMEOUT")]
    print(f"\n{len(rows)} checks, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
