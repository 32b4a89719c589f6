"""``python -m chatglm.bench``: setup, time to first token, decode speed and memory of our int4 model
against the machine's memory-bandwidth floor and against the official dequantize-then-matmul
baseline, measured in one run. See ``--help`` and the README's performance section."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..weights.checkpoint import CheckpointError, find_weight_files
from ..quant.dispatch import default_dtype
from . import concurrency, kernels, measure
from .randomckpt import DEFAULT_CACHE, SHAPES, ensure_checkpoint
from .report import summarize, table



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m chatglm.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="a real int4 model directory (default: a cached random checkpoint)")
    ap.add_argument("--shape", default="6b", choices=sorted(SHAPES), help="random checkpoint shape (default 6b)")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"where random checkpoints live ({DEFAULT_CACHE})")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--prompts", default="32,512,2048", help="prompt lengths for time to first token")
    ap.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed (median reported)")
    ap.add_argument("--baseline-tokens", type=int, default=3, help="decode steps of the baseline (0: skip it)")
    ap.add_argument("--torch-int4-tokens", type=int, default=32,
                    help="decode steps of torch's int4 kernel path, today's CPU path (0: skip it)")
    ap.add_argument("--batch-tokens", type=int, default=16, help="decode steps timed at each batch of M rows (in interleaved rounds)")
    ap.add_argument("--chatglm-cpp-model", help="a chatglm.cpp GGML file (q4_0) to time, if chatglm_cpp is installed")
    ap.add_argument("--concurrency", default="",
                    help="comma-separated stream counts (e.g. 1,2,4,8): measure N streams batched by the engine "
                         "thread instead of the single-stream figures")
    ap.add_argument("--concurrency-tokens", type=int, default=16, help="tokens each concurrent stream decodes")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", choices=("ours", "setup-warm", "baseline", "torch-int4", "concurrency"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.prompt_lengths = [int(p) for p in args.prompts.split(",") if p.strip()]
    except ValueError:
        ap.error(f"--prompts must be comma-separated integers, got {args.prompts!r}")
    try:
        args.concurrency_levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    except ValueError:
        ap.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if any(n < 1 for n in args.concurrency_levels) or args.concurrency_tokens < 2:
        ap.error("--concurrency levels must be >= 1 and --concurrency-tokens >= 2")
    if (args.decode_tokens < 1 or args.baseline_tokens < 0 or args.torch_int4_tokens < 0 or args.batch_tokens < 1
            or any(p < 1 for p in args.prompt_lengths)):
        ap.error("--decode-tokens and --batch-tokens must be >= 1, --baseline-tokens and --torch-int4-tokens >= 0 "
                 "and every prompt length >= 1")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def run_worker(args: argparse.Namespace) -> None:
    """Measure one model in this (fresh) process so that its peak RSS is its own."""
    device = pick_device(args.device)
    dtype = default_dtype(device)
    out: dict = {}
    if args.worker == "setup-warm":
        measure.read_files_seconds(args.weights)
        run = measure.ModelRun(args.weights, device, dtype, "auto")
        Path(args.worker_out).write_text(json.dumps({"setup_seconds": run.setup_seconds,
                                                     "peak_rss": measure.peak_rss_bytes()}))
        return
    if args.worker == "concurrency":
        run = measure.ModelRun(args.weights, device, dtype, "auto")
        levels = concurrency.run_levels(run.model, args.concurrency_levels, new_tokens=args.concurrency_tokens)
        Path(args.worker_out).write_text(json.dumps({"backend": run.backend, "levels": levels}))
        return
    if args.worker == "ours":
        out["cold_cache"] = measure.drop_page_cache(args.weights)
        out["read_seconds_cold"], out["weight_file_bytes"] = measure.read_files_seconds(args.weights)
        out["read_seconds"], _ = measure.read_files_seconds(args.weights)
        measure.drop_page_cache(args.weights)
    backend = {"ours": "auto", "baseline": "reference", "torch-int4": "cpu-int4"}[args.worker]
    run = measure.ModelRun(args.weights, device, dtype, backend)
    out.update(backend=run.backend, setup_seconds=run.setup_seconds, rss_after_setup=run.rss_after_setup,
               decode_bytes_per_token=measure.decode_bytes_per_token(run.model),
               prefill_flops_per_token=measure.prefill_flops_per_token(run.model),
               int4_weights=measure.int4_weight_count(run.model))
    if args.worker == "ours":
        run.time_to_first_token(8, 1)  # warm-up
        out["ttft_seconds"] = {str(n): run.time_to_first_token(n, 3 if n <= 64 else 1) for n in args.prompt_lengths}
        out["decode_step_seconds"] = run.decode_step_seconds(args.decode_tokens)
        if device.type == "cpu":
            out["paths"] = kernels.paths()
            out["streaming"] = kernels.streaming_rates(run.model)
            out["streaming_m4"] = kernels.streaming_rates(run.model, rows=4)  # bound by the dot products
            out["batched_decode_seconds"] = kernels.batched_decode_rounds(run.model, kernels.BATCH_ROWS,
                                                                          args.batch_tokens)
    elif args.worker == "torch-int4":
        n = 512 if 512 in args.prompt_lengths else max(args.prompt_lengths)  # the prefill target's length
        out["ttft_seconds"] = {str(n): run.time_to_first_token(n, 1)}
        out["decode_step_seconds"] = run.decode_step_seconds(args.torch_int4_tokens)
        out["streaming"] = kernels.streaming_rates(run.model)
        out["batched_decode_seconds"] = {"4": kernels.batched_decode_seconds(run.model, 4, args.batch_tokens)}
        # Ours again in this process, the two decoding in turns: the ratio the decode target uses.
        ours = measure.ModelRun(args.weights, device, dtype, "auto")
        out["interleaved_decode_seconds"] = measure.interleaved_decode({"ours": ours, "torch-int4": run},
                                                                       args.torch_int4_tokens)
    else:
        out["decode_step_seconds"] = run.decode_step_seconds(args.baseline_tokens, prompt_tokens=8)
    out["peak_rss"] = measure.peak_rss_bytes()
    Path(args.worker_out).write_text(json.dumps(out))


def spawn_worker(args: argparse.Namespace, kind: str, model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "chatglm.bench", "--worker", kind, "--worker-out", str(result),
               "--weights", str(model_dir), "--device", args.device, "--prompts", args.prompts,
               "--decode-tokens", str(args.decode_tokens), "--baseline-tokens", str(args.baseline_tokens),
               "--torch-int4-tokens", str(args.torch_int4_tokens), "--batch-tokens", str(args.batch_tokens),
               "--concurrency", args.concurrency, "--concurrency-tokens", str(args.concurrency_tokens)]
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"the {kind} benchmark process failed (exit {proc.returncode}); see its output above")
        return json.loads(result.read_text())


def time_chatglm_cpp(path: str | None, tokens: int) -> dict:
    """Decode ms/token of chatglm.cpp on a GGML file, when its Python package is installed."""
    try:
        import chatglm_cpp
    except ImportError:
        return {"status": "not installed (optional: pip install chatglm-cpp)"}
    if not path:
        return {"status": "installed, but no --chatglm-cpp-model GGML file was given"}
    try:
        pipe = chatglm_cpp.Pipeline(path)
        config = chatglm_cpp.GenerationConfig(max_length=4096, do_sample=False)
        ids = list(range(100, 132))
        steps = []
        for n_past in range(tokens + 1):
            t0 = time.perf_counter()
            token = pipe.model.generate_next_token(ids, config, n_past and len(ids) - 1, 4096)
            steps.append(time.perf_counter() - t0)
            ids.append(token)
        return {"status": "measured", "decode_step_seconds": steps[1:],
                "decode_ms_median": 1e3 * statistics.median(steps[1:])}
    except Exception as exc:  # an optional third-party baseline must not stop our benchmark
        return {"status": f"failed: {type(exc).__name__}: {exc}"}


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device)}
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    device = pick_device(args.device)
    if args.weights:
        model_dir = Path(args.weights)
        try:
            find_weight_files(model_dir)
        except CheckpointError as exc:
            raise SystemExit(f"--weights: {exc}") from None
    else:
        print(f"random {args.shape} int4 checkpoint in {args.cache_dir} (built once) ...", flush=True)
        model_dir = ensure_checkpoint(args.cache_dir, args.shape)
    args.weights = str(model_dir)
    results: dict = {"model_dir": str(model_dir), "machine": machine_info(device)}
    print("measuring memory bandwidth and matmul rates ...", flush=True)
    bandwidth = [measure.read_bandwidth(device)]
    stream = [kernels.stream_read_bandwidth()] if device.type == "cpu" else []
    dtype = default_dtype(device)
    results["matmul_flops"] = {str(dtype).removeprefix("torch."): measure.matmul_rate(dtype, device),
                               "float32": measure.matmul_rate(torch.float32, device)}
    if args.concurrency_levels:
        print(f"concurrent streams {args.concurrency} ...", flush=True)
        run = spawn_worker(args, "concurrency", model_dir)
        results["summary"] = {"backend": run["backend"], "concurrency": run["levels"]}
        print(concurrency.table(run["levels"]))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            print(f"results written to {args.json}")
        return
    print("our model ...", flush=True)
    results["ours"] = spawn_worker(args, "ours", model_dir)
    results["ours"]["warm"] = spawn_worker(args, "setup-warm", model_dir)
    if args.torch_int4_tokens and device.type == "cpu":
        print("today's CPU path: torch's int4 kernel (cpu-int4) ...", flush=True)
        bandwidth.append(measure.read_bandwidth(device))
        stream.append(kernels.stream_read_bandwidth())
        results["torch_int4"] = spawn_worker(args, "torch-int4", model_dir)
    if args.baseline_tokens:
        print("baseline: dequantize the whole weight, then matmul ...", flush=True)
        results["baseline"] = spawn_worker(args, "baseline", model_dir)
    results["chatglm_cpp"] = time_chatglm_cpp(args.chatglm_cpp_model, args.decode_tokens)
    bandwidth.append(measure.read_bandwidth(device))
    results["bandwidth_bytes_per_s"] = bandwidth  # torch's x.sum() over 1 GiB
    if device.type == "cpu":
        stream.append(kernels.stream_read_bandwidth())
        results["stream_read"] = [r for r in stream if r is not None]  # our extension's streaming read
    results["summary"] = summarize(results, dtype)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
