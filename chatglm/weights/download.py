"""Downloads an official model into ``weights/`` with huggingface_hub (progress bars included) and,
for fp16 models, converts it to int4 once so that the service loads int4 directly; an int4 model
published as ``.bin`` is rewritten once as safetensors (same tensors), which load faster and leaner.

    python -m chatglm.download THUDM/chatglm3-6b            # -> weights/ (int4 safetensors)
    python -m chatglm.download THUDM/chatglm2-6b-int4 --out weights
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import shutil
import socket
import tempfile
from pathlib import Path

from .checkpoint import find_weight_files
from ..config import ChatGLMConfig
from .convert import convert_to_int4

# Revisions used when --revision is not given. chatglm2-6b-int4 is pinned to the commit the test
# fixtures were generated from; the others are resolved to a commit at download time and that commit
# is recorded in weights/DOWNLOAD.json, so a later run can pass it as --revision.
PINNED_REVISIONS = {
    "THUDM/chatglm2-6b-int4": "382cc704",
    "THUDM/chatglm3-6b": "main",
    "THUDM/chatglm3-6b-32k": "main",
}
FILE_PATTERNS = ["config.json", "tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py",
                 "MODEL_LICENSE", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json"]


def download(repo_id: str, out_dir: str | Path = "weights", revision: str | None = None,
             convert: bool = True) -> Path:
    """Fetch ``repo_id`` at ``revision`` (default: the pinned one) and leave an int4 model in ``out_dir``."""
    from huggingface_hub import HfApi, snapshot_download

    if repo_id not in PINNED_REVISIONS and revision is None:
        raise ValueError(f"{repo_id}: no pinned revision; pass --revision (known: {', '.join(PINNED_REVISIONS)})")
    rev = revision or PINNED_REVISIONS[repo_id]
    commit = HfApi().model_info(repo_id, revision=rev).sha or rev
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        src = Path(snapshot_download(repo_id, revision=commit, local_dir=Path(tmp) / "src",
                                     allow_patterns=FILE_PATTERNS))
        config = ChatGLMConfig.from_json(src / "config.json")
        ready = src
        if config.quantization_bit != 4 and convert:
            print(f"converting {repo_id} to int4 (once, ahead of time) ...")
            ready = convert_to_int4(src, Path(tmp) / "int4")
        elif config.quantization_bit == 4 and find_weight_files(src).kind != "safetensors":
            print(f"rewriting {repo_id} as safetensors (once: the fast, memory-lean load) ...")
            ready = convert_to_int4(src, Path(tmp) / "int4")  # int4 tensors are copied unchanged
        _remove_previous_download(out_dir)
        for f in ready.iterdir():
            if f.is_file():
                shutil.move(str(f), out_dir / f.name)
    record = {"repo_id": repo_id, "revision": commit, "converted_to_int4": bool(convert and not config.quantization_bit)}
    (out_dir / "DOWNLOAD.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _remove_previous_download(out_dir: Path) -> None:
    """Delete the model files an earlier download left in ``out_dir`` (it holds one model): stale
    weights would otherwise be loaded instead of, or mixed with, the new ones (safetensors win over
    .bin). Other files are kept."""
    for f in out_dir.iterdir():
        if f.is_file() and any(fnmatch.fnmatch(f.name, pattern) for pattern in FILE_PATTERNS):
            f.unlink()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m chatglm.download", description=__doc__.split("\n\n")[0])
    ap.add_argument("repo_id", help=f"official model repository ({', '.join(PINNED_REVISIONS)}; "
                    "others need --revision)")
    ap.add_argument("--out", default="weights", help="target directory (default: weights/)")
    ap.add_argument("--revision", default=None, help="commit, branch or tag (default: pinned)")
    ap.add_argument("--keep-fp16", action="store_true", help="do not convert an fp16 model to int4")
    args = ap.parse_args(argv)
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        print(download(args.repo_id, args.out, args.revision, convert=not args.keep_fp16))
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        ap.exit(1, f"error: the Hugging Face Hub at {constants.ENDPOINT} refused {args.repo_id}: {first}\n")
    except _network_errors() as exc:
        ap.exit(1, f"error: cannot reach the Hugging Face Hub at {constants.ENDPOINT} to download {args.repo_id} "
                   f"({type(exc).__name__}: {str(exc)[:200]})\n"
                   f"Check the network connection (and HF_ENDPOINT or the proxy settings), or copy an official "
                   f"model directory into {args.out}/ by hand (see the README's Weights section).\n")
    except ValueError as exc:
        ap.error(str(exc))


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the Hub could not be reached: connection errors and the transport
    errors of the HTTP client huggingface_hub uses (whichever of them is installed); not disk errors."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("huggingface_hub.errors", "OfflineModeIsEnabled")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


if __name__ == "__main__":
    main()
