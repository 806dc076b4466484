"""What the Triton kernels and their launchers share."""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# log2(e): the kernels run softmax in base 2 with ``softmax_scale * LOG2E`` folded into the
# scores (host code reads ``LOG2E.value``).
LOG2E = tl.constexpr(1.4426950408889634)
# Every launch asks for fused multiply-adds: the kernels were validated with them (Triton's
# default up to 3.9), and 3.9 warns that 3.10's default will leave them off.
FMA = dict(enable_fp_fusion=True)


class Tile(NamedTuple):
    """Launch shape of one kernel: ``rows`` of the program's own block (queries, or keys in a
    pass that owns a key block) and ``cols`` of the blocks its loops walk."""
    rows: int
    cols: int
    warps: int
    stages: int


def cdiv(a, b):
    """``ceil(a / b)`` for ints. ``triton.cdiv`` goes through Triton's constexpr wrapper, a few
    microseconds a call: too slow for the host side of a decode step, which runs per token and
    layer."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), without Triton's wrapper."""
    return 1 << max(n - 1, 0).bit_length()


def interpreted():
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype):
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``.

    fp32 operands get fp32-accurate products from three TF32 tensor-core products ("tf32x3"):
    no silent TF32 rounding, and unlike plain FMA "ieee" dots it compiles in seconds at
    attention tile sizes. 16-bit operands take the default.
    """
    return "tf32x3" if dtype == torch.float32 else None


@triton.jit
def row_tile(base, start, stride_n, BLOCK: tl.constexpr, COLS: tl.constexpr, stride_d=1):
    """Pointers to rows ``[start, start + BLOCK)``, columns ``[0, COLS)`` of an ``[N, D]`` slice:
    the row offset is 64-bit (``N * stride_n`` may pass 2**31), offsets inside the tile 32-bit."""
    return (base + tl.cast(start, tl.int64) * stride_n
            + tl.arange(0, BLOCK)[:, None] * stride_n + tl.arange(0, COLS)[None, :] * stride_d)


@triton.jit
def online_softmax_step(m_i, l_i, o_i, s, v, PV_PRECISION: tl.constexpr):
    """One block of a base-2 online softmax: running row max ``m``, sum ``l`` and output ``o``
    ``[M, D]`` take logits ``s`` ``[M, N]`` (``-inf`` = not visible) and values ``v`` ``[N, D]``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may see no key yet: keep exp2 away from (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    o_i = o_i * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PV_PRECISION)
    return m_new, l_i, o_i
