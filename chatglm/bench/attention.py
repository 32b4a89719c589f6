"""``python -m chatglm.bench.attention``: peak memory of one prompt chunk's attention at a long
context, measured on this machine at a small head width, and computed for the 6B shape on GPUs.

Each form runs in a fresh process and reports the growth of its resident high-water mark: the
chunk attention the model uses (lower-right causal bias, fused kernel), and the math kernel that a
boolean mask combined with grouped-query attention falls to on CUDA (scores materialised).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

HEADS, GROUPS, HEAD_DIM_6B = 32, 2, 128


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _worker(form: str, length: int, chunk: int, head_dim: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..model.attention import chunk_attention
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, chunk, head_dim, generator=gen)
    k = torch.randn(1, GROUPS, length, head_dim, generator=gen)
    v = torch.randn(1, GROUPS, length, head_dim, generator=gen)
    before = _hwm_bytes()
    if form == "ours":
        chunk_attention(q, k, v)
    else:  # what the math kernel does: the scores of every head for the whole chunk
        with sdpa_kernel(SDPBackend.MATH):
            qpos = torch.arange(length - chunk, length)[:, None]
            mask = torch.arange(length)[None, :] <= qpos
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return {"form": form, "peak_growth_bytes": _hwm_bytes() - before}


def computed_gpu_bytes(length: int, chunk: int, dtype_bytes: int = 2) -> dict:
    """Temporaries of one layer's chunk attention for the 6B shape (fp16/bf16 activations)."""
    from ..model.attention import attention_peak_bytes
    return {"fused (ours)": attention_peak_bytes(chunk, length, HEADS, GROUPS, HEAD_DIM_6B, dtype_bytes, True),
            "math kernel (float32 scores)": 4 * HEADS * chunk * length}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m chatglm.bench.attention", description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=16, help="head width measured here (6B: 128)")
    ap.add_argument("--worker", choices=("ours", "math"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.length, args.chunk, args.head_dim)))
        return
    print(f"one {args.chunk}-token chunk at {args.length} positions, {HEADS} heads / {GROUPS} groups")
    for form in ("ours", "math"):
        out = subprocess.run([sys.executable, "-m", "chatglm.bench.attention", "--worker", form, "--length",
                              str(args.length), "--chunk", str(args.chunk), "--head-dim", str(args.head_dim)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out)
        print(f"  measured on CPU, head_dim {args.head_dim}, float32, {form:>4}: "
              f"{r['peak_growth_bytes'] / 2**20:8.0f} MiB")
    for name, b in computed_gpu_bytes(args.length, args.chunk).items():
        print(f"  computed for the 6B shape (head_dim {HEAD_DIM_6B}, fp16) on a GPU, {name}: {b / 2**30:.2f} GiB "
              "per layer call")


if __name__ == "__main__":
    main()
