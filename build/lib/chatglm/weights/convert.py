"""Writes checkpoints as safetensors (single file or sharded with an index), and converts an fp16
model directory to int4 once, ahead of time, so that the service loads int4 directly."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import find_weight_files, iter_tensors
from ..config import ChatGLMConfig
from ..quant.int4 import QUANTIZED_LINEARS, quantize_int4

COPY_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py", "MODEL_LICENSE",
              "generation_config.json")


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: str | Path,
                     max_shard_bytes: int | None = None) -> list[Path]:
    """Save ``tensors`` into ``out_dir`` as ``model.safetensors``, or as shards
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when they exceed
    ``max_shard_bytes``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        path = out_dir / "model.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({k: path.name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def convert_to_int4(src_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """Quantize the encoder linears of an fp16 model directory to the official int4 format and write
    it as safetensors with config.json (``quantization_bit: 4``) and the tokenizer files beside it."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if src_dir.resolve() == out_dir.resolve():
        raise ValueError("convert_to_int4: the output directory must differ from the source directory")
    ChatGLMConfig.from_json(src_dir / "config.json")  # refuse unsupported models before any work
    files = find_weight_files(src_dir)
    out: dict[str, torch.Tensor] = {}
    for key, tensor, _ in iter_tensors(files):
        module = key.rpartition(".")[0]
        if key.endswith(".weight") and module.endswith(QUANTIZED_LINEARS) and tensor.is_floating_point():
            out[key], out[key + "_scale"] = quantize_int4(tensor)
        elif tensor.is_floating_point():
            out[key] = tensor.to(torch.float16)
        else:
            out[key] = tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, out_dir, max_shard_bytes)
    raw = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    raw["quantization_bit"] = 4
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    for name in COPY_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m chatglm.convert",
                                 description="Convert an fp16 ChatGLM model directory to int4 safetensors.")
    ap.add_argument("src", help="fp16 model directory (config.json, weights, tokenizer.model)")
    ap.add_argument("out", help="output directory")
    args = ap.parse_args(argv)
    print(convert_to_int4(args.src, args.out))


if __name__ == "__main__":
    main()
