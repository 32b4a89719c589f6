"""Helpers for the reliability and fuzz tests: a fixture model with a short context, what a caller's
error looks like, forward-call counting, and the resident memory of a process tree."""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# The message of every failed prediction that is the caller's fault: it starts with the input it is
# about, or it is the context-length error, which gives both numbers.
USER_ERROR = re.compile(r"^(prompt|system_prompt|messages|tools|stop_sequences|min_tokens|max_tokens|top_k|seed|temperature|top_p|repetition_penalty)\b"
                        r"|^the prompt has \d+ tokens but the context holds \d+")


def short_context_copy(src: Path, dest: Path, seq_length: int) -> Path:
    """A copy of the model directory ``src`` whose config.json says ``seq_length``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, dest / f.name)
    config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    config["seq_length"] = seq_length
    (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


class CallCounter:
    """How many times a module's forward ran (one per prefill or decode step)."""

    def __init__(self) -> None:
        self.calls = 0


@contextmanager
def count_forward(module: Any, raise_at: int | None = None,
                  error: BaseException | None = None) -> Iterator[CallCounter]:
    """Count the forward calls of ``module``; with ``raise_at``, raise ``error`` after that call (as
    Cog's cancel signal does in the middle of a decode step)."""
    counter = CallCounter()

    def hook(*_: Any) -> None:
        counter.calls += 1
        if raise_at is not None and counter.calls == raise_at and error is not None:
            raise error

    handle = module.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/<pid>/status (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from the PPid lines under /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        match = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
        if match:
            parents[int(entry)] = int(match.group(1))
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier and child not in tree]
        tree += children
        frontier = children
    return tree
