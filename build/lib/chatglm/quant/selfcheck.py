"""The safety net under the int4 backends: before a model uses a backend, the backend computes a
random layer of each of the model's real int4 shapes, at decode and at prefill row counts, and is
compared with the reference dequantization. A backend that fails to build, raises or disagrees is
dropped for the next one in :data:`chatglm.quant.dispatch.PREFERENCE`; the list ends at
``reference`` (dequantize + ``F.linear``, plain torch). Each reason is logged once per process."""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch

from .dispatch import BACKENDS, candidates, prepare_layer
from .int4 import dequantize_int4
from .linear import Int4Linear

log = logging.getLogger(__name__)

ROWS = (1, 3, 40)
"""Input rows checked: single-token decode, a small batch of decode rows, a prefill chunk."""
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
"""Allowed relative L2 error against the float32 reference, by activation dtype."""
CPU_CHECK_ROWS = 192
"""On CPU a layer is checked with its real input width but at most this many output rows: the width
is where kernels differ (group sizes, padding), and a full 27392-row weight would cost setup time."""

_verdicts: dict[tuple, str | None] = {}


def layer_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The distinct ``(out_features, in_features)`` of the model's int4 layers."""
    return sorted({(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Int4Linear)})


def check_backend(name: str, device: torch.device, dtype: torch.dtype,
                  shapes: Iterable[tuple[int, int]]) -> str | None:
    """Why ``name`` fails on ``device``/``dtype`` for ``shapes``; None when it passes (cached)."""
    shapes = tuple(sorted(set(shapes)))
    key = (name, str(device), dtype, shapes)
    if key not in _verdicts:
        _verdicts[key] = _run_check(name, device, dtype, shapes)
    return _verdicts[key]


def _run_check(name: str, device: torch.device, dtype: torch.dtype, shapes: Sequence[tuple[int, int]]) -> str | None:
    gen = torch.Generator().manual_seed(1234)
    for out_f, in_f in shapes:
        rows = min(out_f, CPU_CHECK_ROWS) if device.type == "cpu" else out_f
        layer = Int4Linear(in_f, rows, bias=False, device="cpu")
        layer.weight.copy_(torch.randint(-128, 128, (rows, in_f // 2), generator=gen, dtype=torch.int8))
        layer.weight_scale.copy_((torch.rand(rows, generator=gen) * 0.02 + 1e-3).half())
        x = torch.randn(max(ROWS), in_f, generator=gen)
        want = x @ dequantize_int4(layer.weight, layer.weight_scale).T
        layer = layer.to(device)
        try:
            prepare_layer(layer, name)
            for m in ROWS:
                got = layer(x[:m].to(device=device, dtype=dtype)).float().cpu()
                err = _relative_error(got, want[:m])
                if not err <= TOLERANCE[dtype]:  # also catches NaN
                    return (f"wrong result on a [{rows}, {in_f}] layer at {m} row(s): relative error {err:.3g} "
                            f"> {TOLERANCE[dtype]:g}")
        except Exception as exc:  # any failure to build or run drops the backend
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} on a [{rows}, {in_f}] layer"
    return None


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def select_backend(device: torch.device, dtype: torch.dtype, shapes: Iterable[tuple[int, int]],
                   order: Sequence[str] | None = None) -> str:
    """The first backend of ``order`` (default: :func:`~chatglm.quant.dispatch.candidates`) that
    passes :func:`check_backend`; each one dropped is logged once with its reason."""
    shapes = list(shapes)
    order = list(order) if order is not None else candidates(device, dtype)
    if "reference" not in order:
        order.append("reference")
    for name in order:
        if name not in BACKENDS:
            raise ValueError(f"unknown int4 backend {name!r}; allowed: {', '.join(BACKENDS)}")
        if name == "reference":
            return name
        first = (name, str(device), dtype, tuple(sorted(set(shapes)))) not in _verdicts
        reason = check_backend(name, device, dtype, shapes)
        if reason is None:
            return name
        if first:
            log.warning("int4 backend %s dropped on %s (%s): %s; trying the next one", name, device, dtype, reason)
    return "reference"


def forget_verdicts() -> None:
    """Clear the cached check results (tests inject failures and check again)."""
    _verdicts.clear()
