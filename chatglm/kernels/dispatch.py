"""Chooses how an :class:`~chatglm.quant.Int4Linear` computes: a prepared fast backend, or the
reference (dequantize to the activation dtype, then matmul)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import dequantize_int4


def int4_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` for an Int4Linear ``layer``."""
    if layer.packed is not None:
        y = layer.packed(x)
    else:
        y = F.linear(x, dequantize_int4(layer.weight, layer.weight_scale, x.dtype))
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y


def prepare_model(model: torch.nn.Module) -> str:
    """Prepare every Int4Linear of ``model`` for the fastest backend that runs here; return its name."""
    from ..quant import Int4Linear
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    return "reference" if layers else "none"
