"""The output layer (65024 x 4096 on the 6B models) as int8 weights with float32 row scales.

Decode reads the whole output layer for every token: in bfloat16 that is 0.53 GB, as int8 0.27 GB,
and our int8 kernel streams it with the activations quantized per block of 128 (as the int4 layers).
The int8 copy is made once at load (per-row absmax / 127); its logits error against the float32
reference is measured on the fixtures by the tests. Used where the AVX512-VNNI path exists; elsewhere
the bfloat16 GEMV stays (:class:`chatglm.quant.dispatch.RowLinear`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import native


class Int8Head(nn.Module):
    """A bias-free linear ``[out, in]`` over int8 ``weight`` and float32 ``weight_scale`` buffers."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        codes, scale = native.quantize_rows_int8(weight.detach())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        parts = [native.int8_gemv(x2[i:i + native.MAX_ROWS], self.weight, self.weight_scale)
                 for i in range(0, x2.shape[0], native.MAX_ROWS)]  # the weight is read once per 8 rows
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


def usable() -> bool:
    """True where the int8 head is fast here: the extension loads and the CPU has AVX512-VNNI."""
    return native.load() and "avx512-vnni" in native.supported_isas()
