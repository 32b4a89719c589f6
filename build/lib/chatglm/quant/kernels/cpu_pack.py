"""Packs official int4 weights straight into the layout of torch's CPU int4 kernel.

torch's converter (``_convert_weight_to_int4pack_for_cpu``) takes int32 codes ``q = c + 8``, four
bytes per weight: going through it took over a minute for a 6B model on 2 cores. This module builds
the same bytes from the official int8 ``[N, K/2]`` tensor with int64 bitwise ops, in bounded memory.

Layout, for a kernel block of ``block`` output rows (64 on AVX512, 32 on AVX2): the block's bytes form
``[K, block/2]``; byte ``[k, d]`` holds ``q[d, k]`` in its low nibble and ``q[d + block/2, k]`` in its
high nibble. :func:`chatglm.kernels.cpu_int4.pack` checks this against torch's converter before use.

Method, per chunk of whole blocks (int64 words of 16 nibbles from one row): a nibble swap between row
``d`` and row ``d + block/2`` gathers each output byte's two nibbles (even columns into one row, odd
into another); three byte swaps transpose every 8 x 8 tile of bytes (one word from each of 8 rows),
so that each word holds 8 consecutive output bytes; one permuting copy of the words, which also adds 8
to every nibble (XOR 0x88), writes them to their place. Each swap is a delta swap,
``t = ((a >> s) ^ b) & m; b ^= t; a ^= t << s``, which exchanges ``(a >> s) & m`` with ``b & m``.

Every op stays below torch's parallel grain size, so it runs on the calling thread, and chunks are
spread over Python threads instead (ops release the GIL): when other processes keep the cores busy,
each of thousands of parallel regions would wait milliseconds for a core, while threads take turns.
On 2 cores a 6B model packs in about 2-4 s (torch's converter: 50-80 s), with about 1 MiB of scratch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

GRAIN = 32768
"""torch's ``at::internal::GRAIN_SIZE``: element-wise ops on fewer elements run on the calling thread."""

_NIBBLE_SWAP = (torch.tensor(4), torch.tensor(0x0F0F0F0F0F0F0F0F))
_BYTE_SWAPS = tuple((torch.tensor(shift), torch.tensor(mask))  # 0-dim tensors: cheaper calls than ints
                    for shift, mask in ((32, 0x00000000FFFFFFFF), (16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF)))
_XOR_OFFSET = torch.tensor(0x8888888888888888 - (1 << 64))  # adds 8 to every nibble, modulo 16


def _delta_swap(a: torch.Tensor, b: torch.Tensor, shift: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                a_out: torch.Tensor, b_out: torch.Tensor) -> None:
    """Write ``a`` and ``b`` with the bits ``(a >> shift) & mask`` and ``b & mask`` exchanged to ``a_out``
    and ``b_out`` (which may be ``a`` and ``b``); ``t`` is scratch of their shape."""
    torch.bitwise_right_shift(a, shift, out=t)
    t.bitwise_xor_(b).bitwise_and_(mask)
    torch.bitwise_xor(b, t, out=b_out)
    torch.bitwise_xor(a, t.bitwise_left_shift_(shift), out=a_out)


def chunk_shape(block: int, words: int, limit: int = 2 * GRAIN - 2) -> tuple[int, int]:
    """``(rows, words)`` of a chunk: whole blocks, and whole rows where a block fits, of at most
    ``limit`` words (the default keeps each swap, on half a chunk, below :data:`GRAIN`)."""
    rows = block * max(1, limit // (block * words))
    return rows, min(words, max(1, limit // rows))


def pack_direct(weight: torch.Tensor, padded_out: int, padded_in: int, block: int, inplace: bool = False,
                workers: int | None = None, limit: int = 2 * GRAIN - 2) -> torch.Tensor:
    """Pack an official int8 ``[out, in/2]`` weight into uint8 ``[padded_out, padded_in/2]``.

    Padding rows and columns get code 0 (``q = 8``). ``block`` must be a multiple of 16 that divides
    ``padded_out``, and ``padded_in`` a multiple of 16. ``inplace=True`` writes the result over
    ``weight`` where it can (no padding, and each chunk holds whole rows, so each chunk is read before
    it is written). ``workers`` threads (default ``torch.get_num_threads()``) share the chunks of at
    most ``limit`` words."""
    n, half_in = weight.shape
    words = padded_in // 16
    if block % 16 or padded_out % block or padded_in % 16 or n > padded_out or 2 * half_in > padded_in:
        raise ValueError(f"pack_direct: cannot pack {n} x {2 * half_in} codes into {padded_out} x {padded_in} "
                         f"in blocks of {block} rows")
    rows, width = chunk_shape(block, words, limit)
    rows = min(rows, padded_out)
    if not weight.is_contiguous():
        weight, inplace = weight.contiguous(), False
    aligned = half_in == 8 * words and weight.storage_offset() % 8 == 0
    src = weight.view(torch.int64) if aligned else None
    inference = torch.is_inference_mode_enabled()  # the workers run in the caller's mode
    if inplace and aligned and n == padded_out and width == words and (inference or not weight.is_inference()):
        out = weight.view(torch.uint8)
    else:
        out = torch.empty(padded_out, padded_in // 2, dtype=torch.uint8)
    dst = out.view(torch.int64).view(padded_out // block, words, 8, 2, block // 16)
    tasks = [(r0, w0) for r0 in range(0, padded_out, rows) for w0 in range(0, words, width)]

    @torch.inference_mode(inference)
    def run(part: list[tuple[int, int]]) -> None:
        packers: dict[tuple[int, int], _ChunkPacker] = {}
        for r0, w0 in part:
            r, w = min(rows, padded_out - r0), min(width, words - w0)
            have = max(0, min(r, n - r0))
            if src is not None and have == r:
                chunk = src[r0 : r0 + r, w0 : w0 + w]
            else:
                staged = torch.zeros(r, 8 * w, dtype=torch.int8)
                c0, c1 = 8 * w0, min(8 * (w0 + w), half_in)
                staged[:have, : max(0, c1 - c0)] = weight[r0 : r0 + have, c0:c1]
                chunk = staged.view(torch.int64)
            if (r, w) not in packers:
                packers[r, w] = _ChunkPacker(r, w, block)
            packers[r, w](chunk, dst[r0 // block : (r0 + r) // block, w0 : w0 + w])

    workers = max(1, min(workers or torch.get_num_threads(), len(tasks)))
    if workers == 1:
        run(tasks)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, [tasks[i::workers] for i in range(workers)]))
    return out


class _ChunkPacker:
    """Scratch buffers, and views of them, that pack chunks of ``[rows, w]`` words (whole blocks)."""

    def __init__(self, rows: int, w: int, block: int) -> None:
        nb, half = rows // block, block // 2
        self.shape = (nb, 2, half, w)
        buf = torch.empty(rows * w, dtype=torch.int64)
        t = torch.empty(rows * w // 2, dtype=torch.int64)
        pairs = buf.view(self.shape)
        self.nibble_out = (t.view(nb, half, w), pairs[:, 1], pairs[:, 0])
        self.swaps = []
        for step, (shift, mask) in enumerate(_BYTE_SWAPS):
            tile = buf.view(-1, 1 << step, 2, w << (2 - step))
            a, b = tile[:, :, 0], tile[:, :, 1]
            self.swaps.append((a, b, shift, mask, t.view(a.shape)))
        words = buf.view(nb, 2, block // 16, 8, w).permute(0, 4, 3, 1, 2)
        step = max(1, (GRAIN - 1) // rows)  # columns per final copy, which stays below GRAIN too
        self.pieces = [(slice(c, c + step), words[:, c : c + step]) for c in range(0, w, step)]

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Pack int64 ``src [rows, w]`` (maybe strided) into ``dst [rows / block, w, 8, 2, block / 16]``."""
        halves = src.view(self.shape)
        t, odd, even = self.nibble_out
        _delta_swap(halves[:, 0], halves[:, 1], *_NIBBLE_SWAP, t, odd, even)
        for a, b, shift, mask, scratch in self.swaps:
            _delta_swap(a, b, shift, mask, scratch, a, b)
        for cols, piece in self.pieces:
            torch.bitwise_xor(piece, _XOR_OFFSET, out=dst[:, cols])
