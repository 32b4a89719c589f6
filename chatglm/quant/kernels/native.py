"""Our C++ CPU kernels (``csrc/*.cpp``), built on first use and registered as ``torch.ops.chatglm``.

The extension is compiled once per source version by ``torch.utils.cpp_extension.load`` (ninja, cached
under ``CHATGLM_EXT_DIR`` or torch's extension directory) with portable flags: each ISA path carries
its own target attribute and is chosen at run time from the CPU's flags, so one build serves the AMX
Xeon, the VNNI-only Xeon and the EPYC alike. A machine where it cannot be built (no compiler, no
ninja) keeps torch's int4 kernel: :func:`load` returns None and logs why, once.

Ops: ``int4_gemv(x[M, K], weight int8 [N, K/2], scale fp16 [N], isa)`` for M = 1..8 rows,
``int8_gemv(x, weight int8 [N, K], scale float32 [N], isa)`` (the output layer) and
``int4_unpack(weight, scale, r0, out)`` (int8 codes or dequantized rows, for prefill) and
``quantize_rows_int8(weight)`` (the output layer's int8 copy); ``stream_read(buf, prefetch)`` reads a
buffer once with the kernels' loads (the benchmark's bandwidth probe); ``rms_norm(x, weight, eps, isa)``
and ``swiglu(x, isa)`` are the decode step's fused bfloat16 row ops (``cpu_fused``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("int4_gemv.cpp", "int4_unpack.cpp", "int8_head.cpp", "stream_read.cpp", "fused_ops.cpp")
HEADERS = ("common.h", "int4_avx2.inc")
ISA_PATHS = {"scalar": 0, "avx2": 1, "avx-vnni": 2, "avx512-vnni": 3}
"""ISA paths by name, as the C++ ``Isa`` enum numbers them."""
MAX_ROWS = 8
"""Input rows one kernel call takes (decode, batched decode); more rows go to the prefill path."""
DISABLE_ENV = "CHATGLM_NO_NATIVE"
"""Set to 1 to skip the extension (as on a machine without a compiler)."""

_state: dict[str, object] = {}


def _build_name() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    # The build records the source and torch header paths, and ninja versions keep different logs:
    # another checkout, torch or ninja sharing the name would rebuild it over this one's at every switch.
    for part in (torch.__version__, str(CSRC), str(Path(torch.__file__).parent), str(shutil.which("ninja"))):
        digest.update(part.encode())
    return f"chatglm_kernels_{digest.hexdigest()[:12]}"


def toolchain_missing() -> str | None:
    """What keeps the extension from being built here (disabled, no compiler, no ninja), or None."""
    if os.environ.get(DISABLE_ENV) == "1":
        return f"{DISABLE_ENV}=1 is set"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build() -> None:
    """Compile (or load the cached build of) the extension; raises when that is impossible."""
    missing = toolchain_missing()
    if missing:
        raise RuntimeError(missing)
    from torch.utils import cpp_extension
    name = _build_name()
    build_dir = os.environ.get("CHATGLM_EXT_DIR") or cpp_extension._get_build_directory(name, verbose=False)
    Path(build_dir).mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(CSRC / s) for s in SOURCES], build_directory=build_dir,
                       extra_cflags=["-O3", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


def load() -> bool:
    """True once the ops are registered; False (logged once, with the reason) where they cannot be."""
    if "ok" not in _state:
        try:
            _build()
            _state["ok"] = True
        except Exception as exc:  # any build failure keeps today's path
            _state["ok"] = False
            _state["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            log.warning("C++ int4 kernels unavailable, using torch's int4 kernel instead (%s)", _state["reason"])
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why the extension is not loaded (None when it is)."""
    return None if load() else str(_state.get("reason"))


def forget() -> None:
    """Forget the load result (tests simulate a machine without a compiler)."""
    _state.clear()


def supported_isas() -> list[str]:
    """The ISA paths this CPU can run, fastest last."""
    return [name for name, v in ISA_PATHS.items() if torch.ops.chatglm.isa_supported(v)]


def best_isa() -> str:
    """The ISA path the kernels take here unless one is forced."""
    code = torch.ops.chatglm.best_isa()
    return next(name for name, v in ISA_PATHS.items() if v == code)


def _isa_code(isa: str | None) -> int:
    if isa is None:
        return -1
    if isa not in ISA_PATHS:
        raise ValueError(f"isa must be one of {', '.join(ISA_PATHS)}, got {isa!r}")
    return ISA_PATHS[isa]


def int4_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``x [M <= 8, K] @ W.T`` for the official int4 ``weight [N, K/2]`` and fp16 ``scale [N]``."""
    return torch.ops.chatglm.int4_gemv(x, weight, scale, _isa_code(isa))


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``x [M <= 8, K] @ (weight * scale[:, None]).T`` for int8 ``weight [N, K]`` and float32 ``scale``."""
    return torch.ops.chatglm.int8_gemv(x, weight, scale, _isa_code(isa))


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 codes (-127..127) and float32 scales (absmax / 127) of a float ``weight [N, K]``."""
    return torch.ops.chatglm.quantize_rows_int8(weight)


def int4_unpack(weight: torch.Tensor, scale: torch.Tensor, r0: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``r0 : r0 + len(out)`` of the official int4 weight into ``out``: int8 codes, or ``code * scale``
    in bfloat16 / float32 (``out``'s dtype). Returns ``out``."""
    return torch.ops.chatglm.int4_unpack(weight, scale, r0, out)


def stream_read(buf: torch.Tensor, prefetch: int = 0) -> int:
    """XOR of every 64-bit word of ``buf`` (contiguous, 64-byte aligned, whole 64-byte lines), read with the
    widest loads here over all threads, software prefetch ``prefetch`` bytes ahead when > 0."""
    return torch.ops.chatglm.stream_read(buf, prefetch)
