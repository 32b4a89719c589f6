"""The int4 linear layer and the module swap that puts it in place of the encoder's linears."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .int4 import QUANTIZED_LINEARS, dequantize_int4, quantize_int4


class Int4Kernel(Protocol):
    """How a prepared :class:`Int4Linear` computes (see :mod:`chatglm.quant.dispatch`)."""

    name: str

    def matmul(self, layer: "Int4Linear", x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] @ W.T -> [..., out]`` without the bias."""
        ...


class Int4Linear(nn.Module):
    """A linear layer that computes from the official packed int4 weight.

    Buffers ``weight`` (int8 ``[out, in/2]``) and ``weight_scale`` (fp16 ``[out]``) carry the official
    state-dict names. A backend may register its own packed buffers beside them (and drop
    ``weight``); every tensor the layer uses is a buffer, so ``.to()`` and ``state_dict()`` see it.
    Until a backend is set (``kernel``), the layer dequantizes the whole weight per call: exact, slow.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        if in_features % 2:
            raise ValueError(f"int4 linear needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.kernel: Int4Kernel | None = None

    @property
    def backend(self) -> str:
        return self.kernel.name if self.kernel is not None else "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = self.kernel.matmul(self, x)
        else:
            y = F.linear(x, dequantize_int4(self.weight, self.weight_scale, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"bias={self.bias is not None}, backend={self.backend}")


def int4_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the linears that the official int4 format quantizes."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, Int4Linear)) and name.endswith(QUANTIZED_LINEARS)]


def _swap_linears(model: nn.Module, fill: bool) -> nn.Module:
    """Replace each encoder nn.Linear by an Int4Linear on the same device; ``fill`` quantizes the
    float weight into it, otherwise it stays empty for a loader."""
    for name in int4_layer_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, Int4Linear):
            continue
        new = Int4Linear(old.in_features, old.out_features, old.bias is not None,
                         device=old.weight.device, dtype=old.weight.dtype)
        if fill:
            new.weight, new.weight_scale = quantize_int4(old.weight)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        setattr(parent, child, new)
    return model


def swap_to_int4(model: nn.Module) -> nn.Module:
    """Replace the encoder's linears by empty :class:`Int4Linear` modules (same device and float dtype),
    without touching the model definition. Weights are filled by the loader."""
    return _swap_linears(model, fill=False)


def quantize_module(model: nn.Module) -> nn.Module:
    """Quantize a float model in place: each encoder linear becomes an :class:`Int4Linear`."""
    return _swap_linears(model, fill=True)
