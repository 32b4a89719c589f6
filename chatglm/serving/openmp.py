"""Releasing the calling thread's OpenMP worker threads when another thread takes over the model.

With torch's OpenMP runtime (libgomp), each thread that runs a parallel op keeps a pool of worker
threads while it lives. When the threads of two pools outnumber the cores, libgomp stops letting idle
workers spin, so every parallel region wakes its workers through the kernel. That costs the small ops
of a decode step most. Measured on a 2-core machine, runs interleaved: a one-row step of the 6B
model in the engine thread took 115.5 ms while the thread that loaded the model kept its pool, and
103.3 ms once that pool was released. ``omp_pause_resource_all`` (OpenMP 5.0) frees the calling
thread's pool; the pool is created again if that thread runs a parallel op later.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
"""``omp_pause_soft`` of ``omp_pause_resource_t``: free the threads, keep the runtime usable."""


@functools.cache
def torch_libgomp() -> ctypes.CDLL | None:
    """The libgomp that torch's parallel ops run on, or None where torch uses another backend (looked
    up once: the predictor releases its pool after every prediction)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")):
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker threads. False (logged at debug level) where torch
    does not run on libgomp or its libgomp lacks ``omp_pause_resource_all``; nothing else changes."""
    lib = torch_libgomp()
    pause = getattr(lib, "omp_pause_resource_all", None) if lib is not None else None
    if pause is None:
        log.debug("OpenMP pool kept: torch does not run on a libgomp with omp_pause_resource_all")
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(OMP_PAUSE_SOFT) == 0
