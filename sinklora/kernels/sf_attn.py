"""SF-Attn forward and backward as Triton kernels.

Math (per batch ``b``, query head ``h``, kv head ``g = h // (Hq // Hkv)``)::

    s_ij = softmax_scale * <q_i, k_j>          for keys j visible to query i (pattern.py)
    p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
    o_i  = sum_j p_ij v_j

    delta_i = <do_i, o_i>
    dv_j = sum_i p_ij do_i
    ds_ij = p_ij (<do_i, v_j> - delta_i)
    dq_i = softmax_scale * sum_j ds_ij k_j,    dk_j = softmax_scale * sum_i ds_ij q_i

The softmax runs in base 2 with ``softmax_scale * log2(e)`` folded into the scores; the row
log-sum-exp is saved in base 2 for the backward pass. Accumulation is fp32.

The visible keys of a query are three disjoint parts (pattern.py). Only the blocks holding
visible keys are touched, in three loops:

- sink keys ``[0, min(num_sink, group_start))`` in a small block of their own (``BLOCK_S``);
- full blocks: key blocks strictly inside the query block's group and below the diagonal,
  loaded and multiplied without any mask;
- edge blocks, masked: the group's first block, the diagonal blocks and, in ``"s2"`` only, the
  wrapped keys ``[N - G/2, N)`` of the first half-group of a shifted head. They are up to three
  separate runs of blocks walked as ONE loop (``_edge_block``): every extra loop holds its own
  registers, and with five loops the kernels spilled (measured with ptxas for sm_90).

Backward: ``dq`` is computed per query block over the same parts as the forward pass. ``dk``
and ``dv`` are computed per key block and kv head, looping over the query heads that share it
(GQA: nothing of size ``Hq`` is materialized for them) and over the query blocks of the key
block's group. Sink keys are read by every query, so their ``dk``/``dv`` come from the ``dq``
programs: each writes its partial sums for the sink block, and the partials are reduced
afterwards. No program walks all N queries.

q/k/v/do may have any strides with a contiguous last dim (transformers hands over transposed
views) and are not copied; a strided last dim is copied first. Batch/head offsets and the row
offset of every tile are 64-bit (``row_tile``), offsets inside a tile 32-bit.
"""
import torch
import triton
import triton.language as tl

from .common import (FMA, LOG2E, Tile, cdiv, dot_precision, interpreted, next_power_of_2,
                     online_softmax_step, row_tile)
from .pattern import group_end, group_start, head_shift, in_group, in_sink, in_wrap, wrap_start

DELTA_ROWS = 32  # rows per program of the delta preprocess (o and do tiles, no dots)

# Which part of the pattern a loop walks; selects the mask inside the shared block helpers.
FULL, EDGE, SINK = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _part_mask(PART: tl.constexpr, i, j, group_size, shift, num_sink, wrap_from, n, wrap_block):
    """Visible pairs of a masked block. An edge block masks by the run it came from: a block
    of the wrap run may also hold keys of the group (tiny N), which its group visit counts."""
    if PART == SINK:
        mask = in_sink(i, j, group_size, shift, num_sink)
    else:
        mask = tl.where(wrap_block, in_wrap(i, j, shift, wrap_from, n),
                        in_group(i, j, group_size, shift))
    return mask


@triton.jit
def _num_blocks(start, stop, BLOCK: tl.constexpr):
    """Blocks of ``BLOCK`` rows from ``start`` until ``stop`` (0 when the run is empty)."""
    return tl.maximum(tl.cdiv(stop - start, BLOCK), 0)


@triton.jit
def _edge_block(it, start1, count1, start2, count2, start3, BLOCK: tl.constexpr):
    """First row of block ``it`` of up to three runs walked as one loop: ``count1`` blocks from
    ``start1``, ``count2`` from ``start2``, then from ``start3``. The part helpers below walk
    ``count1 + count2 + count3`` blocks so; a part of one run leaves the other two empty."""
    start = start1 + it * BLOCK
    start = tl.where(it >= count1, start2 + (it - count1) * BLOCK, start)
    return tl.where(it >= count1 + count2, start3 + (it - count1 - count2) * BLOCK, start)


@triton.jit
def _load_rows(base, start, stride_n, n, MASKED: tl.constexpr, BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Rows ``[start, start + BLOCK)`` of one head; rows past ``n`` read as 0 when ``MASKED``
    (unmasked blocks are known to lie inside the sequence)."""
    ptrs = row_tile(base, start, stride_n, BLOCK, HEAD_DIM)
    if MASKED:
        tile = tl.load(ptrs, mask=(start + tl.arange(0, BLOCK))[:, None] < n, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _query_plan(m0, bh, n, num_heads, kv_group, shift_heads, group_size, num_sink, is_s2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """What a forward or dq program (query block ``[m0, m0 + BLOCK_M)``, program ``bh``) walks:
    batch ``b``, query head ``h``, kv head ``g`` (64-bit, for offsets), the head's ``shift`` and
    ``wrap_from``, its rows ``offs_m`` and which are real (``row_ok``), then the key blocks of
    each part as (first key, blocks): ``sink_blocks`` of ``BLOCK_S`` keys from 0, up to the last
    row's group start; unmasked, ``full_blocks`` from ``full_from``, inside every row's group and
    below the diagonal; masked, the group's leading ``lead_blocks`` from ``lead_from`` and
    trailing ``trail_blocks`` from ``trail_from`` (the diagonal), and the ``"s2"`` wrap,
    ``wrap_blocks`` from ``wrap_from``."""
    h = bh % num_heads
    shift = head_shift(h, num_heads, shift_heads, group_size)
    b = (bh // num_heads).to(tl.int64)
    g = (h // kv_group).to(tl.int64)
    wrap_from = wrap_start(shift, n, is_s2)
    rows_end = tl.minimum(m0 + BLOCK_M, n)
    last_group_start = group_start(rows_end - 1, group_size, shift)
    lead_from = group_start(m0, group_size, shift) // BLOCK_N * BLOCK_N
    full_from = tl.cdiv(last_group_start, BLOCK_N) * BLOCK_N
    full_to = (m0 + 1) // BLOCK_N * BLOCK_N
    trail_from = tl.maximum(full_to, full_from)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    return (b, h.to(tl.int64), g, shift, wrap_from, offs_m, offs_m < n,
            _num_blocks(0, tl.minimum(num_sink, last_group_start), BLOCK_S),
            full_from, _num_blocks(full_from, full_to, BLOCK_N),
            lead_from, _num_blocks(lead_from, tl.minimum(full_from, rows_end), BLOCK_N),
            trail_from, _num_blocks(trail_from, rows_end, BLOCK_N),
            _num_blocks(wrap_from, n, BLOCK_N) * (m0 < shift))


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_part(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, n, group_size,
              shift, num_sink, wrap_from, qk_scale, HEAD_DIM: tl.constexpr,
              DOT_PRECISION: tl.constexpr, PART: tl.constexpr, BLOCK_K: tl.constexpr, start1,
              count1, start2=0, count2=0, start3=0, count3=0):
    for it in range(0, count1 + count2 + count3):
        start_n = _edge_block(it, start1, count1, start2, count2, start3, BLOCK_K)
        offs_n = start_n + tl.arange(0, BLOCK_K)
        k = _load_rows(k_base, start_n, stride_kn, n, PART != FULL, BLOCK_K, HEAD_DIM)
        v = _load_rows(v_base, start_n, stride_vn, n, PART != FULL, BLOCK_K, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if PART != FULL:
            mask = _part_mask(PART, offs_m[:, None], offs_n[None, :], group_size, shift, num_sink,
                              wrap_from, n, wrap_block=it >= count1 + count2)
            s = tl.where(mask, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _sf_attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n, num_heads, kv_group, shift_heads, group_size, num_sink, is_s2, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    (b, h, g, shift, wrap_from, offs_m, row_ok, sink_blocks, full_from, full_blocks, lead_from,
     lead_blocks, trail_from, trail_blocks, wrap_blocks) = _query_plan(
        m0, bh, n, num_heads, kv_group, shift_heads, group_size, num_sink, is_s2, BLOCK_M,
        BLOCK_N, BLOCK_S)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, m0, stride_qn, n, True, BLOCK_M, HEAD_DIM)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_part(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, n,
                              group_size, shift, num_sink, wrap_from, qk_scale, HEAD_DIM,
                              DOT_PRECISION, PART=SINK, BLOCK_K=BLOCK_S, start1=0,
                              count1=sink_blocks)
    acc, l_i, m_i = _fwd_part(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, n,
                              group_size, shift, num_sink, wrap_from, qk_scale, HEAD_DIM,
                              DOT_PRECISION, PART=FULL, BLOCK_K=BLOCK_N, start1=full_from,
                              count1=full_blocks)
    acc, l_i, m_i = _fwd_part(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, n,
                              group_size, shift, num_sink, wrap_from, qk_scale, HEAD_DIM,
                              DOT_PRECISION, PART=EDGE, BLOCK_K=BLOCK_N, start1=lead_from,
                              count1=lead_blocks, start2=trail_from, count2=trail_blocks,
                              start3=wrap_from, count3=wrap_blocks)

    # Every real row sees at least itself, so l_i > 0 there; rows past n (never stored) may
    # have seen nothing, and get 1 to keep the arithmetic finite.
    l_i = tl.where(row_ok, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(row_tile(O + b * stride_ob + h * stride_oh, m0, stride_on, BLOCK_M, HEAD_DIM),
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * n + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh,
                      stride_don, n, num_heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    row_ok = offs_m < n
    o = _load_rows(O + b * stride_ob + h * stride_oh, m0, stride_on, n, True, BLOCK_M, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, m0, stride_don, n, True, BLOCK_M,
                    HEAD_DIM)
    tl.store(DELTA + bh.to(tl.int64) * n + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=row_ok)


@triton.jit
def _dq_part(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, n, group_size,
             shift, num_sink, wrap_from, qk_scale, sink_dk_base, sink_dv_base,
             HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, PART: tl.constexpr,
             BLOCK_K: tl.constexpr, start1, count1, start2=0, count2=0, start3=0, count3=0):
    # d s / d(q k^T) = softmax_scale, folded into ds before the cast to the operands' dtype:
    # ds alone may pass fp16's range where the gradients fit it.
    softmax_scale = qk_scale / LOG2E
    for it in range(0, count1 + count2 + count3):
        start_n = _edge_block(it, start1, count1, start2, count2, start3, BLOCK_K)
        offs_n = start_n + tl.arange(0, BLOCK_K)
        k = _load_rows(k_base, start_n, stride_kn, n, PART != FULL, BLOCK_K, HEAD_DIM)
        v = _load_rows(v_base, start_n, stride_vn, n, PART != FULL, BLOCK_K, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if PART != FULL:
            mask = _part_mask(PART, offs_m[:, None], offs_n[None, :], group_size, shift, num_sink,
                              wrap_from, n, wrap_block=it >= count1 + count2)
            p = tl.where(mask, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None]) * softmax_scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if PART == SINK:
            # This query block's share of the sink keys' dk/dv; reduced over blocks on the host.
            offs_s = offs_n[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
            is_sink = offs_n[:, None] < num_sink
            tl.store(sink_dv_base + offs_s,
                     tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION),
                     mask=is_sink)
            tl.store(sink_dk_base + offs_s,
                     tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION),
                     mask=is_sink)
    return dq


@triton.jit
def _sf_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SINK_DK, SINK_DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    n, num_heads, kv_group, shift_heads, group_size, num_sink, is_s2, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    m0 = pid_m * BLOCK_M
    bh = tl.program_id(1)
    (b, h, g, shift, wrap_from, offs_m, row_ok, sink_blocks, full_from, full_blocks, lead_from,
     lead_blocks, trail_from, trail_blocks, wrap_blocks) = _query_plan(
        m0, bh, n, num_heads, kv_group, shift_heads, group_size, num_sink, is_s2, BLOCK_M,
        BLOCK_N, BLOCK_S)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, m0, stride_qn, n, True, BLOCK_M, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, m0, stride_don, n, True, BLOCK_M,
                    HEAD_DIM)
    lse = tl.load(LSE + bh.to(tl.int64) * n + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * n + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    # Sink partials: [B * Hq, num_query_blocks, num_sink, HEAD_DIM] fp32, zero-initialized.
    sink_off = (bh.to(tl.int64) * tl.num_programs(0) + pid_m) * num_sink * HEAD_DIM
    sink_dk_base = SINK_DK + sink_off
    sink_dv_base = SINK_DV + sink_off

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_part(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, n,
                  group_size, shift, num_sink, wrap_from, qk_scale, sink_dk_base, sink_dv_base,
                  HEAD_DIM, DOT_PRECISION, PART=SINK, BLOCK_K=BLOCK_S, start1=0,
                  count1=sink_blocks)
    dq = _dq_part(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, n,
                  group_size, shift, num_sink, wrap_from, qk_scale, sink_dk_base, sink_dv_base,
                  HEAD_DIM, DOT_PRECISION, PART=FULL, BLOCK_K=BLOCK_N, start1=full_from,
                  count1=full_blocks)
    dq = _dq_part(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, n,
                  group_size, shift, num_sink, wrap_from, qk_scale, sink_dk_base, sink_dv_base,
                  HEAD_DIM, DOT_PRECISION, PART=EDGE, BLOCK_K=BLOCK_N, start1=lead_from,
                  count1=lead_blocks, start2=trail_from, count2=trail_blocks, start3=wrap_from,
                  count3=wrap_blocks)
    tl.store(row_tile(DQ + b * stride_dqb + h * stride_dqh, m0, stride_dqn, BLOCK_M, HEAD_DIM),
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_part(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
               offs_n, n, group_size, shift, wrap_from, qk_scale, HEAD_DIM: tl.constexpr,
               DOT_PRECISION: tl.constexpr, PART: tl.constexpr, BLOCK_Q: tl.constexpr, start1,
               count1, start2=0, count2=0, start3=0, count3=0):
    # No sink part here (the dq programs cover the sink keys), so no num_sink.
    softmax_scale = qk_scale / LOG2E  # folded into ds before the cast, as in _dq_part
    for it in range(0, count1 + count2 + count3):
        start_m = _edge_block(it, start1, count1, start2, count2, start3, BLOCK_Q)
        offs_m = start_m + tl.arange(0, BLOCK_Q)
        q = _load_rows(q_base, start_m, stride_qn, n, PART != FULL, BLOCK_Q, HEAD_DIM)
        do = _load_rows(do_base, start_m, stride_don, n, PART != FULL, BLOCK_Q, HEAD_DIM)
        if PART == FULL:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        else:
            lse = tl.load(lse_base + offs_m, mask=offs_m < n, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < n, other=0.0)
        # Transposed scores: rows are keys, columns are queries.
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if PART != FULL:
            mask = _part_mask(PART, offs_m[None, :], offs_n[:, None], group_size, shift,
                              num_sink=0, wrap_from=wrap_from, n=n,
                              wrap_block=it >= count1 + count2) & (offs_m[None, :] < n)
            pt = tl.where(mask, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :]) * softmax_scale
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _sf_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    n, num_heads, num_kv_heads, kv_group, shift_heads, group_size, is_s2, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    bg = tl.program_id(1)
    b = (bg // num_kv_heads).to(tl.int64)
    g = (bg % num_kv_heads).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n[:, None] < n
    k = _load_rows(K + b * stride_kb + g * stride_kh, n0, stride_kn, n, True, BLOCK_N, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + g * stride_vh, n0, stride_vn, n, True, BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    n_last = tl.minimum(n0 + BLOCK_N, n) - 1

    for h in range(g * kv_group, (g + 1) * kv_group):
        shift = head_shift(h, num_heads, shift_heads, group_size)
        wrap_from = wrap_start(shift, n, is_s2)
        bh = b * num_heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * n
        delta_base = DELTA + bh * n
        # Queries that see these keys through their group: from the first key to the end of the
        # last key's group. Query blocks past the last key and inside the first key's group see
        # every key of the block, unmasked. Masked: the leading and trailing query blocks and,
        # in "s2", the first half-group of a shifted head when these keys are wrapped keys.
        queries_end = group_end(n_last, group_size, shift, n)
        full_from = tl.cdiv(n_last, BLOCK_M) * BLOCK_M
        full_to = group_end(n0, group_size, shift, n) // BLOCK_M * BLOCK_M
        lead_from = n0 // BLOCK_M * BLOCK_M
        lead_blocks = _num_blocks(lead_from, tl.minimum(full_from, queries_end), BLOCK_M)
        trail_from = tl.maximum(full_to, full_from)
        trail_blocks = _num_blocks(trail_from, queries_end, BLOCK_M)
        wrap_blocks = _num_blocks(0, shift, BLOCK_M) * (n_last >= wrap_from)
        dk, dv = _dkdv_part(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn,
                            stride_don, offs_n, n, group_size, shift, wrap_from, qk_scale,
                            HEAD_DIM, DOT_PRECISION, PART=FULL, BLOCK_Q=BLOCK_M,
                            start1=full_from, count1=_num_blocks(full_from, full_to, BLOCK_M))
        dk, dv = _dkdv_part(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn,
                            stride_don, offs_n, n, group_size, shift, wrap_from, qk_scale,
                            HEAD_DIM, DOT_PRECISION, PART=EDGE, BLOCK_Q=BLOCK_M,
                            start1=lead_from, count1=lead_blocks, start2=trail_from,
                            count2=trail_blocks, start3=0, count3=wrap_blocks)

    tl.store(row_tile(DK + b * stride_dkb + g * stride_dkh, n0, stride_dkn, BLOCK_N, HEAD_DIM),
             dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(row_tile(DV + b * stride_dvb + g * stride_dvh, n0, stride_dvn, BLOCK_N, HEAD_DIM),
             dv.to(DV.dtype.element_ty), mask=key_ok)


# ----------------------------------------------------------------------------------------------
# launchers


# Tiles per (16-bit or fp32, head dim up to): forward, dq, dk/dv. fp32 runs 3xTF32 dots
# (common.py), whose operands are split in two: smaller tiles.
_TILES = {
    ("16bit", 64): (Tile(128, 64, 8, 3), Tile(128, 64, 8, 3), Tile(128, 32, 8, 3)),
    ("16bit", 128): (Tile(128, 64, 8, 3), Tile(128, 32, 8, 3), Tile(128, 32, 8, 3)),
    ("16bit", 256): (Tile(64, 32, 8, 3), Tile(32, 32, 8, 1), Tile(32, 32, 8, 2)),
    ("fp32", 64): (Tile(64, 32, 4, 2), Tile(32, 16, 4, 2), Tile(32, 32, 8, 2)),
    ("fp32", 128): (Tile(16, 32, 8, 2), Tile(16, 16, 4, 1), Tile(16, 32, 8, 2)),
    # Spills at every tile that fits (3xTF32 at D=256); these spill least (ptxas, sm_90).
    ("fp32", 256): (Tile(16, 16, 8, 1), Tile(16, 16, 8, 1), Tile(16, 16, 8, 1)),
}


def compiled_tiles(head_dim, dtype):
    """``{"fwd": Tile, "dq": Tile, "dkdv": Tile}`` of ``_TILES``: each compiles for sm_90 within
    the H100's shared memory, and except fp32 at D = 256 without register spills, with Triton 3.6
    to 3.9 (ptxas, tests/kernels/test_cuda_compile.py); bench/tune_sf.py times candidates."""
    key = ("fp32" if dtype == torch.float32 else "16bit", max(64, head_dim))
    return dict(zip(("fwd", "dq", "dkdv"), _TILES[key]))


def tiles(head_dim, dtype):
    """The launchers' default tiles: ``compiled_tiles``, or under the interpreter small tiles,
    which exercise the block-edge logic at test sizes."""
    if interpreted():
        return dict.fromkeys(("fwd", "dq", "dkdv"), Tile(16, 16, 1, 1))
    return compiled_tiles(head_dim, dtype)


def _default_tiles(head_dim, dtype):
    # Read per call (bench/tune_sf.py replaces ``tiles``); sf_attn_backward's argument hides it.
    return tiles(head_dim, dtype)


def _sink_block(num_sink):
    return max(16, min(64, next_power_of_2(max(num_sink, 1))))


def new_output(shape, dtype, device):
    """Allocates a kernel output; tests replace it to poison outputs before the kernel writes."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides3(t):
    assert t.stride(3) == 1, "head dim must be contiguous"
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def sf_attn_forward(q, k, v, group_size, num_sink, shift_heads, is_s2, softmax_scale, tile=None):
    """Returns ``(o, lse)``: o like q (contiguous), lse ``[B, Hq, N]`` fp32 in base 2.
    ``tile``: the forward kernel's ``Tile``, by default ``tiles(head_dim, dtype)["fwd"]``."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    bsz, num_heads, n, head_dim = q.shape
    tile = tile or _default_tiles(head_dim, q.dtype)["fwd"]
    o = new_output(q.shape, q.dtype, q.device)
    lse = new_output((bsz, num_heads, n), torch.float32, q.device)
    grid = (cdiv(n, tile.rows), bsz * num_heads)
    _sf_attn_fwd_kernel[grid](
        q, k, v, o, lse, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
        n, num_heads, num_heads // k.shape[1], shift_heads, group_size, num_sink, int(is_s2),
        softmax_scale * LOG2E.value,
        HEAD_DIM=head_dim, BLOCK_M=tile.rows, BLOCK_N=tile.cols, BLOCK_S=_sink_block(num_sink),
        DOT_PRECISION=dot_precision(q.dtype), num_warps=tile.warps, num_stages=tile.stages, **FMA,
    )
    return o, lse


def sf_attn_backward(do, q, k, v, o, lse, group_size, num_sink, shift_heads, is_s2,
                     softmax_scale, tiles=None):
    """Returns ``(dq, dk, dv)`` shaped like q, k, v. ``tiles``: ``{"dq": Tile, "dkdv": Tile}``
    (other keys are ignored), by default ``tiles(head_dim, dtype)``."""
    do, q, k, v = (_last_dim_contiguous(t) for t in (do, q, k, v))
    bsz, num_heads, n, head_dim = q.shape
    num_kv_heads = k.shape[1]
    kv_group = num_heads // num_kv_heads
    launch = tiles or _default_tiles(head_dim, q.dtype)
    qk_scale = softmax_scale * LOG2E.value
    precision = dot_precision(q.dtype)

    delta = new_output((bsz, num_heads, n), torch.float32, q.device)
    _bwd_delta_kernel[(cdiv(n, DELTA_ROWS), bsz * num_heads)](
        o, do, delta, *_strides3(o), *_strides3(do), n, num_heads,
        HEAD_DIM=head_dim, BLOCK_M=DELTA_ROWS, **FMA,
    )

    tile = launch["dq"]
    num_q_blocks = cdiv(n, tile.rows)
    # At least one row: a zero-size CUDA tensor has a null pointer, which launchers refuse.
    sink_dk = torch.zeros((bsz, num_heads, num_q_blocks, max(num_sink, 1), head_dim),
                          dtype=torch.float32, device=q.device)
    sink_dv = torch.zeros_like(sink_dk)
    dq = new_output(q.shape, q.dtype, q.device)
    _sf_attn_bwd_dq_kernel[(num_q_blocks, bsz * num_heads)](
        q, k, v, do, lse, delta, dq, sink_dk, sink_dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
        n, num_heads, kv_group, shift_heads, group_size, num_sink, int(is_s2), qk_scale,
        HEAD_DIM=head_dim, BLOCK_M=tile.rows, BLOCK_N=tile.cols, BLOCK_S=_sink_block(num_sink),
        DOT_PRECISION=precision, num_warps=tile.warps, num_stages=tile.stages, **FMA,
    )

    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    # Roles swap: a program owns a key block (BLOCK_N rows of k) and walks query tiles.
    tile = launch["dkdv"]
    _sf_attn_bwd_dkdv_kernel[(cdiv(n, tile.rows), bsz * num_kv_heads)](
        q, k, v, do, lse, delta, dk, dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk),
        *_strides3(dv),
        n, num_heads, num_kv_heads, kv_group, shift_heads, group_size, int(is_s2), qk_scale,
        HEAD_DIM=head_dim, BLOCK_N=tile.rows, BLOCK_M=tile.cols,
        DOT_PRECISION=precision, num_warps=tile.warps, num_stages=tile.stages, **FMA,
    )

    if num_sink > 0:
        rows = min(num_sink, n)
        sink_dk = sink_dk.view(bsz, num_kv_heads, -1, num_sink, head_dim).sum(2)[:, :, :rows]
        sink_dv = sink_dv.view(bsz, num_kv_heads, -1, num_sink, head_dim).sum(2)[:, :, :rows]
        dk[:, :, :rows] = (dk[:, :, :rows].float() + sink_dk).to(dk.dtype)
        dv[:, :, :rows] = (dv[:, :, :rows].float() + sink_dv).to(dv.dtype)
    return dq, dk, dv
