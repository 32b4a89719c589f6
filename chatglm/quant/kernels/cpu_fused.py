"""Fused bfloat16 row ops of the CPU decode step (RMSNorm, SwiGLU) from our C++ extension.

They replace a chain of small eager torch ops (each allocating and re-reading the row) only where
:func:`applies`: the extension is loaded, the tensor is on the CPU and bfloat16. float32 (the
reference path) and CUDA keep the torch formulas, so their outputs do not change. Each op computes
rows independently in float32 and rounds once to bfloat16 (SwiGLU also rounds silu(gate) first, as
torch's bfloat16 ``silu(g) * u`` does).
"""
from __future__ import annotations

import torch

from . import native

ENABLED = True
"""Module switch: False keeps the torch formulas everywhere (the benchmark compares both)."""

_state: dict[str, object] = {}


def _ready() -> bool:
    if "ok" not in _state:
        _state["ok"] = native.load()
        if _state["ok"]:
            _register_fakes()
    return bool(_state["ok"])


def _register_fakes() -> None:
    """Shapes for tracing (torch.compile, meta tensors): the ops allocate their output like this."""
    @torch.library.register_fake("chatglm::rms_norm")
    def _rms_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, isa: int = -1) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("chatglm::swiglu")
    def _swiglu_fake(x: torch.Tensor, isa: int = -1) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def applies(x: torch.Tensor) -> bool:
    """True where the fused ops take ``x``: switch on, CPU, bfloat16, extension loaded."""
    return ENABLED and x.device.type == "cpu" and x.dtype == torch.bfloat16 and _ready()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, isa: str | None = None) -> torch.Tensor:
    """``(weight * x * rsqrt(mean(x^2, -1) + eps))`` per row of bfloat16 ``x``, in float32, as bfloat16."""
    _ready()
    return torch.ops.chatglm.rms_norm(x, weight, eps, native._isa_code(isa))


def swiglu(x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of bfloat16 ``x = [gate | up]`` (halves of the last dimension), per row."""
    _ready()
    return torch.ops.chatglm.swiglu(x, native._isa_code(isa))
