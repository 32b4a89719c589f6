"""Safetensors files mapped into memory: each tensor is a view of the page cache, not a copy.

Loading is then the operating system reading the file (or finding it already cached) and nothing
more: int4 codes and scales that the model keeps as stored are used in place, so setup costs about
one read of the file and the resident set holds each weight once. Each tensor's pages are faulted in
(``MADV_POPULATE_READ``) before it is handed out, so the first prediction does not pay for the disk;
the whole file is also announced for read-ahead (``MADV_WILLNEED``).

A tensor the loader converts (cast to another dtype, quantized, copied to the GPU) is released after
the conversion with :func:`release`: its pages leave this process's resident set (the page cache may
keep them) and the mapping stays valid, so a later read would fault them back in from the file.

The mapping is private and copy-on-write: a write to a weight changes this process's copy only,
never the file. The files must not be truncated or rewritten in place while the service runs;
deleting or replacing them, as ``python -m chatglm.download`` does, is safe (the mapping keeps the old
file's data).
"""
from __future__ import annotations

import logging
import mmap
import threading
import weakref
from pathlib import Path
from typing import Iterator

import torch

from .safetensors_read import in_file_order, read_header

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux >= 5.14; where the kernel refuses it, each page is touched instead."""

_mappings: "weakref.WeakValueDictionary[int, mmap.mmap]" = weakref.WeakValueDictionary()
"""Live mappings by base address, so that :func:`release` can tell a mapped tensor from any other."""
_populate = {"ok": True}
PREFETCH_CHUNK = 2 << 20
"""Bytes one prefetch call faults in: small, because the call holds the GIL."""


class MappedSafetensors:
    """One safetensors file mapped read-only (copy-on-write). :meth:`tensors` yields its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data_start, self.header = read_header(self.path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        _mappings[self._bytes.data_ptr()] = self._map
        _advise(self._map, mmap.MADV_WILLNEED, 0, len(self._map))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in file order, each a view of the mapping with its pages faulted in. A
        tensor whose offset is not a multiple of its element size is copied (views must be aligned)."""
        for key, dtype, shape, begin, end in in_file_order(self.data_start, self.header):
            if end == begin:
                yield key, torch.empty(shape, dtype=dtype)
                continue
            _fault_in(self._map, self._bytes, begin, end)
            raw = self._bytes[begin:end]
            if begin % dtype.itemsize:
                raw = raw.clone()
            yield key, raw.view(dtype).view(shape)


def _advise(m: mmap.mmap, advice: int, begin: int, end: int) -> bool:
    """``madvise`` over the whole pages that hold bytes ``begin:end``; False where refused."""
    start = begin - begin % PAGE
    try:
        m.madvise(advice, start, end - start)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def _fault_in(m: mmap.mmap, data: torch.Tensor, begin: int, end: int) -> None:
    if _populate["ok"] and _advise(m, MADV_POPULATE_READ, begin, end):
        return
    if _populate["ok"]:
        _populate["ok"] = False
        log.info("MADV_POPULATE_READ is not available here; weight pages are touched one by one instead")
    int(data[begin:end:PAGE].sum())


def release(tensor: torch.Tensor) -> bool:
    """Drop the pages that lie wholly inside ``tensor`` from this process's resident set, where it is a
    view of a live mapping made here; True if it was one. Its contents stay readable (from the file)."""
    storage = tensor.untyped_storage()
    m = _mappings.get(storage.data_ptr())
    if m is None or tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    begin = tensor.data_ptr() - storage.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = -(-begin // PAGE) * PAGE, end - end % PAGE
    if last > first:
        m.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True


def prefetch(paths: list[Path]) -> threading.Thread:
    """Start reading ``paths`` into the page cache in a background thread and return it, so that the
    disk works while the caller does something else (the kernels' self-check) before mapping them.
    Each chunk is unmapped again once read: the page cache keeps it, this process does not."""
    def run() -> None:
        for path in paths:
            try:
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                    for begin in range(0, len(m), PREFETCH_CHUNK):
                        end = min(begin + PREFETCH_CHUNK, len(m))
                        if not _advise(m, MADV_POPULATE_READ, begin, end):
                            return
                        _advise(m, mmap.MADV_DONTNEED, begin, end)  # cached, but not resident here twice
            except (OSError, ValueError):  # the loader reports unreadable files itself
                return

    thread = threading.Thread(target=run, name="weights-prefetch", daemon=True)
    thread.start()
    return thread
