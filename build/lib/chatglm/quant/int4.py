"""The official ChatGLM int4 weight format and an int4 linear layer that computes from it.

Format (as published in ``THUDM/chatglm2-6b-int4``): ``weight`` is ``int8 [out, in/2]``; byte
``weight[o, j]`` holds two signed 4-bit codes, the high nibble for input column ``2j`` and the low
nibble for column ``2j + 1``; ``weight_scale`` is ``fp16 [out]`` and ``W[o, i] = code[o, i] * scale[o]``.
"""
from __future__ import annotations

import torch


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
