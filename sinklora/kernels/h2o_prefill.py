"""H2O prefill: causal attention over the prompt and the column sums of its probabilities.

The math (per sequence ``b``, query head ``h`` reading key/value head ``g = h // R``, a prompt of
``n`` tokens, ``real_i`` = 0 for pads):

    s_ij   = scale * q_i . k_j            visible iff j <= i and real_j
    lse_i  = log sum_{visible j} exp(s_ij)
    o_i    = sum_{visible j} exp(s_ij - lse_i) v_j            (0 when nothing is visible)
    acc_j  = sum_{h reading g} sum_{i >= j, real_i} exp(s_ij - lse_i)     per kv head ``g``

``acc`` sums columns of the probability matrix, which a row-wise flash-attention pass cannot
produce. Instead of materializing ``n x n``, two passes share the row log-sum-exp:

1. ``_prefill_attention``: flash attention forward, one program per (query block, batch, query
   head), online softmax in base 2 with the scale folded in; writes the output straight into
   transformers' ``[B, n, Hq, D]`` layout, whose rows pass element 2**31 of a head at long
   prompts (tile row offsets are 64-bit, ``row_tile``), and ``lse`` (base 2, ``+inf`` for pad
   queries so they add nothing to the scores).
2. ``_prefill_column_sums``: one program per (key block, batch, kv head) holds its keys, walks
   every query head of the group and every query block at or below the diagonal, recomputes
   ``exp2(s - lse)`` and sums over queries. GQA is never expanded: heads of a group share ``k``.
"""

import torch
import triton
import triton.language as tl

from .common import (FMA, LOG2E, Tile, cdiv, dot_precision, next_power_of_2,
                     online_softmax_step, row_tile)


def prefill_tile(dtype, head_dim_p):
    """The ``Tile`` of both prefill kernels (rows: query blocks, cols: key blocks; the column
    sums walk them swapped). Each compiles for sm_90 inside the H100's shared memory and, except
    fp32 at D = 256, without register spills (tests/kernels checks)."""
    if dtype == torch.float32:  # 3xTF32 dots split every operand in two: smaller tiles
        return {128: Tile(16, 32, 8, 2), 256: Tile(16, 32, 8, 1)}.get(head_dim_p,
                                                                      Tile(32, 64, 8, 3))
    return Tile(64, 64, 8, 2) if head_dim_p >= 256 else Tile(64, 64, 4, 3)


@triton.jit
def _prefill_attention(
    Q, K, V, REAL, OUT, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rn,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ln,
    seq_len, qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_PAD: tl.constexpr, QK_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // NUM_HEADS).to(tl.int64)
    h = (bh % NUM_HEADS).to(tl.int64)
    g = h // GROUP
    m0 = tl.program_id(0) * BLOCK_Q
    i = m0 + tl.arange(0, BLOCK_Q)
    i_ok = i < seq_len
    d_ok = tl.arange(0, HEAD_DIM_P) < HEAD_DIM

    q = tl.load(row_tile(Q + b * stride_qb + h * stride_qh, m0, stride_qn, BLOCK_Q, HEAD_DIM_P,
                         stride_qd), mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    o_i = tl.zeros([BLOCK_Q, HEAD_DIM_P], tl.float32)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    hi = tl.minimum(m0 + BLOCK_Q, seq_len)
    for start in range(0, hi, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        j_ok = j < seq_len
        kv_ok = j_ok[:, None] & d_ok[None, :]
        k = tl.load(row_tile(k_base, start, stride_kn, BLOCK_K, HEAD_DIM_P, stride_kd), mask=kv_ok,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION) * qk_scale
        visible = (j[None, :] <= i[:, None]) & j_ok[None, :]
        if HAS_PAD:
            real_j = tl.load(REAL + b * stride_rb + j * stride_rn, mask=j_ok, other=0)
            visible &= (real_j != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(row_tile(v_base, start, stride_vn, BLOCK_K, HEAD_DIM_P, stride_vd), mask=kv_ok,
                    other=0.0)
        m_i, l_i, o_i = online_softmax_step(m_i, l_i, o_i, s, v, PV_PRECISION)

    o_i = o_i / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(row_tile(OUT + b * stride_ob + h * stride_oh, m0, stride_on, BLOCK_Q, HEAD_DIM_P,
                      stride_od), o_i.to(OUT.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])
    counts = l_i > 0
    if HAS_PAD:
        counts &= tl.load(REAL + b * stride_rb + i * stride_rn, mask=i_ok, other=0) != 0
    lse = tl.where(counts, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(LSE + b * stride_lb + h * stride_lh + i * stride_ln, lse, mask=i_ok)


@triton.jit
def _prefill_column_sums(
    Q, K, REAL, LSE, ACC,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_rb, stride_rn,
    stride_lb, stride_lh, stride_ln,
    stride_ab, stride_ah, stride_an,
    seq_len, qk_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_PAD: tl.constexpr, QK_PRECISION: tl.constexpr,
):
    bg = tl.program_id(1)
    b = (bg // NUM_KV_HEADS).to(tl.int64)
    g = (bg % NUM_KV_HEADS).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_K
    j = n0 + tl.arange(0, BLOCK_K)
    j_ok = j < seq_len
    d_ok = tl.arange(0, HEAD_DIM_P) < HEAD_DIM

    k = tl.load(row_tile(K + b * stride_kb + g * stride_kh, n0, stride_kn, BLOCK_K, HEAD_DIM_P,
                         stride_kd), mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    key_ok = j_ok
    if HAS_PAD:
        key_ok &= tl.load(REAL + b * stride_rb + j * stride_rn, mask=j_ok, other=0) != 0
    acc = tl.zeros([BLOCK_K], tl.float32)
    # Queries before the block's first key see none of it (causal): start at its query block.
    first = n0 // BLOCK_Q * BLOCK_Q
    for r in range(0, GROUP):
        h = g * GROUP + r
        for start in range(first, seq_len, BLOCK_Q):
            i = start + tl.arange(0, BLOCK_Q)
            i_ok = i < seq_len
            q = tl.load(row_tile(Q + b * stride_qb + h * stride_qh, start, stride_qn, BLOCK_Q,
                                 HEAD_DIM_P, stride_qd), mask=i_ok[:, None] & d_ok[None, :],
                        other=0.0)
            lse = tl.load(LSE + b * stride_lb + h * stride_lh + i * stride_ln, mask=i_ok,
                          other=float("inf"))
            s = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION) * qk_scale
            visible = (j[None, :] <= i[:, None]) & key_ok[None, :]
            acc += tl.sum(tl.where(visible, tl.exp2(s - lse[:, None]), 0.0), 0)
    tl.store(ACC + b * stride_ab + g * stride_ah + j * stride_an, acc, mask=j_ok)


def h2o_prefill_fwd(query, key, value, real, softmax_scale, *, out=None, tile=None):
    """Launches the two prefill kernels.

    Args:
        query: ``[B, Hq, n, D]``; key, value: ``[B, Hkv, n, D]`` (any strides, one dtype).
        real: ``[B, n]`` bool/int (0 = pad) or ``None`` when nothing is padded.
        out: optional ``[B, n, Hq, D]`` destination (transformers' layout).
        tile: the kernels' ``Tile``, by default ``prefill_tile(query.dtype, padded head dim)``.

    Returns:
        ``(out [B, n, Hq, D] in query's dtype, acc [B, Hkv, n] float32)``.
    """
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    head_dim_p = max(16, next_power_of_2(head_dim))
    if out is None:
        out = query.new_empty(batch, seq_len, num_heads, head_dim)
    lse = query.new_empty(batch, num_heads, seq_len, dtype=torch.float32)
    acc = query.new_empty(batch, num_kv_heads, seq_len, dtype=torch.float32)
    has_pad = real is not None
    if has_pad and real.dtype == torch.bool:
        real = real.view(torch.uint8)
    real_arg = real if has_pad else lse
    real_strides = real.stride() if has_pad else (0, 0)
    qk_scale = softmax_scale * LOG2E.value
    tile = tile or prefill_tile(query.dtype, head_dim_p)
    meta = dict(GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_Q=tile.rows,
                BLOCK_K=tile.cols, HAS_PAD=has_pad, QK_PRECISION=dot_precision(query.dtype),
                num_warps=tile.warps, num_stages=tile.stages, **FMA)

    _prefill_attention[(cdiv(seq_len, tile.rows), batch * num_heads)](
        query, key, value, real_arg, out, lse, *query.stride(), *key.stride(), *value.stride(),
        *real_strides, *out.stride(), *lse.stride(), seq_len, qk_scale, NUM_HEADS=num_heads,
        PV_PRECISION=dot_precision(value.dtype), **meta,
    )
    _prefill_column_sums[(cdiv(seq_len, tile.cols), batch * num_kv_heads)](
        query, key, real_arg, lse, acc,
        *query.stride(), *key.stride(), *real_strides, *lse.stride(), *acc.stride(),
        seq_len, qk_scale, NUM_KV_HEADS=num_kv_heads, **meta,
    )
    return out, acc
