"""Int4 matmul kernels for the official ChatGLM int4 weight format.

``native``: our C++ CPU kernels (``csrc/``, built on first use), ``cpu_native``: the int4 layer on
them (decode GEMV, prefill GEMM), ``cpu_head``: the int8 output layer.
``cpu_int4``: torch's CPU weight-only int4 kernel for decode plus an int8-GEMM path for prefill.
``triton_int4``: a fused dequantize-and-multiply Triton kernel for CUDA GPUs (imports without Triton).
Nothing heavy is imported here: import the submodule you need.
"""
