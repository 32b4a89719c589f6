"""The official ChatGLM int4 weight format and an int4 linear layer that computes from it.

Format (as published in ``THUDM/chatglm2-6b-int4``): ``weight`` is ``int8 [out, in/2]``; byte
``weight[o, j]`` holds two signed 4-bit codes, the high nibble for input column ``2j`` and the low
nibble for column ``2j + 1``; ``weight_scale`` is ``fp16 [out]`` and ``W[o, i] = code[o, i] * scale[o]``.
"""
from __future__ import annotations

import torch
from torch import nn


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed codes ``int8 [out, in]`` in ``-8..7`` into the official ``int8 [out, in/2]`` layout."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_int4 needs a 2-D code matrix with an even number of columns, got {tuple(codes.shape)}")
    c = codes.to(torch.int16)
    if int(c.min()) < -8 or int(c.max()) > 7:
        raise ValueError("pack_int4: codes must lie in -8..7")
    high = (c[:, 0::2] & 0xF) << 4
    low = c[:, 1::2] & 0xF
    packed = (high | low).to(torch.uint8)
    return packed.view(torch.int8)


def unpack_int4(weight: torch.Tensor) -> torch.Tensor:
    """Unpack the official ``int8 [out, in/2]`` layout into signed codes ``int8 [out, in]``."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"unpack_int4 needs an int8 [out, in/2] tensor, got {weight.dtype} {tuple(weight.shape)}")
    # int8 shifts are arithmetic: ``w >> 4`` is the high code, ``(w << 4) >> 4`` sign-extends the low one
    return torch.stack((weight >> 4, (weight << 4) >> 4), dim=-1).view(weight.shape[0], 2 * weight.shape[1])


def dequantize_int4(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization: ``W[o, i] = float(scale[o]) * code[o, i]`` in ``dtype``."""
    codes = unpack_int4(weight)
    return torch.mul(codes, scale.to(torch.float32)[:, None]).to(dtype)  # float32 products, then one rounding


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight ``[out, in]`` the official way: ``scale = absmax(row) / 7``,
    ``code = round(w / scale)``, computed in fp16 like the reference. Returns (packed int8, fp16 scale)."""
    w16 = w.detach().to(torch.float16)
    scale = (w16.abs().amax(dim=1) / 7).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(w16 / safe[:, None]).clamp_(-8, 7).to(torch.int8)
    return pack_int4(codes), scale


QUANTIZED_LINEARS = ("self_attention.query_key_value", "self_attention.dense",
                     "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


class Int4Linear(nn.Module):
    """A linear layer that computes from the official packed int4 weight.

    Buffers ``weight`` (int8 ``[out, in/2]``) and ``weight_scale`` (fp16 ``[out]``) carry the official
    state-dict names. The computation is picked per call by :mod:`chatglm.kernels.dispatch`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        if in_features % 2:
            raise ValueError(f"int4 linear needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.packed = None  # a backend's repacked weight, see chatglm.kernels.dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.dispatch import int4_linear
        return int4_linear(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, bias={self.bias is not None}"


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
