"""Reads safetensors files: the header, checked, and (where a file cannot be memory-mapped, see
:mod:`chatglm.weights.mapped`) each tensor with plain file reads.

The read path puts each tensor into its own buffer, so the process holds only what the model keeps
plus one tensor in flight. The operating system is asked to read ahead the whole file, and a reader
thread keeps the next tensors ready, so disk reads overlap with the caller's work on the previous
tensor.

Format: 8 bytes little-endian header length ``n``, then ``n`` bytes of JSON mapping each name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets from the end of the header) and an
optional ``"__metadata__"``; then the data.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import queue
import threading
from pathlib import Path
from typing import Iterator

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 << 20


class SafetensorsFormatError(ValueError):
    """The file is not a complete, well-formed safetensors file."""


def read_header(path: str | Path) -> tuple[int, dict[str, dict]]:
    """``(data_start, entries)``: where the data begins and each tensor's header entry, checked
    against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{size} bytes: too short for a header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsFormatError(f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsFormatError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    for key, e in header.items():
        dtype, shape, (begin, end) = _check_entry(key, e)
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or begin < 0:
            raise SafetensorsFormatError(f"{key}: data_offsets {begin}..{end} do not hold {want} bytes")
        if start + end > size:
            raise SafetensorsFormatError(f"{key} ends at byte {start + end} but the file has {size} bytes")
    return start, header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(key: str, e: object) -> tuple[torch.dtype, list[int], list[int]]:
    """``(dtype, shape, data_offsets)`` of a header entry; SafetensorsFormatError naming the tensor and
    the field for anything but a known dtype name, a list of non-negative integer dimensions and two
    integer offsets (no strings, floats or booleans)."""
    if not isinstance(e, dict):
        raise SafetensorsFormatError(f"{key}: header entry must be an object, got {_short(e)}")
    dtype = e.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsFormatError(f"{key}: dtype {_short(dtype)} is not one of {', '.join(DTYPES)}")
    shape = e.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise SafetensorsFormatError(f"{key}: shape must be a list of non-negative integers, got {_short(shape)}")
    offsets = e.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SafetensorsFormatError(f"{key}: data_offsets must be two integers [begin, end], got {_short(offsets)}")
    return DTYPES[dtype], shape, offsets


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def in_file_order(data_start: int, header: dict[str, dict]) -> Iterator[tuple[str, torch.dtype, list[int], int, int]]:
    """``(name, dtype, shape, begin, end)`` of every entry of a checked header, by position in the file;
    ``begin:end`` are the tensor's bytes from the start of the file."""
    for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        yield key, DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]], data_start + begin, data_start + end


def _read_tensor(f, key: str, dtype: torch.dtype, shape: list[int], begin: int, end: int) -> torch.Tensor:
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    data = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
    view = memoryview((ctypes.c_char * (end - begin)).from_address(data.data_ptr())).cast("B")
    f.seek(begin)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise SafetensorsFormatError(f"{key}: file ended after {begin + done} bytes")
        done += n
    return data.view(dtype).view(shape)


def iter_safetensors(path: str | Path, read_ahead: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in file order, each tensor freshly read into its own memory.

    A reader thread keeps up to ``read_ahead`` tensors ready (file reads release the GIL), so the
    disk works while the caller converts or packs the previous tensor; 0 reads in the caller."""
    tensors = _read_in_order(path)
    if read_ahead <= 0:
        yield from tensors
        return
    ready: queue.Queue = queue.Queue(maxsize=read_ahead)
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def reader() -> None:
        try:
            for item in tensors:
                put(item)
                if stop.is_set():  # the caller stopped: read no further
                    tensors.close()
                    return
            put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=reader, name="safetensors-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _read_in_order(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in file order, read in the calling thread, the OS asked to read ahead."""
    start, header = read_header(path)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        for key, dtype, shape, begin, end in in_file_order(start, header):
            yield key, _read_tensor(f, key, dtype, shape, begin, end)
