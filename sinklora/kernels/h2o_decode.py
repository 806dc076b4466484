"""H2O decode: one new token per sequence, attention + score update + eviction, two launches.

The math (per sequence ``b`` and key/value head ``g``; ``R = Hq / Hkv`` query heads read ``g``).
The layer stores ``L`` entries ``(k_j, v_j, pos_j, acc_j)``, ``pos_j = -1`` marks a pad. The new
token brings ``(k_new, v_new)`` as entry ``L``; let ``T`` be the real tokens seen including it,
so its position is ``T - 1`` (``-1`` when the new token itself is a pad).

    s_rj  = scale * q_r . k_j                     (-inf where pos_j < 0: pads are never attended)
    lse_r = log sum_j exp(s_rj)
    o_r   = sum_j exp(s_rj - lse_r) v_j           the attention output
    acc_j += sum_r exp(s_rj - lse_r)              per kv head: summed over its query heads
                                                  (nothing when the new token is a pad)

If ``L == budget`` one entry leaves: the victim is the candidate with the smallest key

    key_j = (real_j, acc_j, pos_j if real_j else slot_j)      lexicographic,

where candidates are the entries that are not protected (``0 <= pos_j < num_sink`` or
``pos_j >= T - recent_budget``): pads go first, then the smallest score, ties to the smallest
position. The new entry is written into the victim's slot (or dropped if it is the victim);
with ``L < budget`` it goes to slot ``L``. Attention does not depend on the order of entries
(keys carry their own RoPE), so slots are reused in place and nothing is compacted.

The kernels (flash-decoding): the ``L + 1`` entries are cut into ``S`` chunks of whole blocks;
the grid is ``(B * Hkv, S)`` in both launches, with ``S`` chosen for about two programs per
SM, so batch 1 with a 32k budget is not one program per kv head.
Storage is contiguous (the state allocates it), so its strides follow from the capacity ``C``,
and the scratch is one allocation: a decode step runs per token and layer, and the host side
of each Triton launch grows with its argument count.

1. ``_decode_partial``: program ``(bg, s)`` loads the ``R`` queries of head ``g`` once (GQA
   without expanding k/v), runs an online softmax over its chunk (the last chunk also takes the
   new entry, read straight from the new k/v), and writes its partial ``(m, l, o)`` plus the
   raw logits ``s_rj`` (base 2) to scratch: ``R * 4`` bytes per entry instead of re-reading the
   key (``2 * D`` bytes) once ``lse`` is known. Program ``(b, 0, 0)`` also advances the
   sequence's real-token counter ``T``.
2. ``_decode_update``: program ``(bg, s)`` merges the ``S`` partials into ``lse`` (and, for
   ``s == 0``, the output), adds the probabilities of its chunk to ``acc`` and finds its chunk's
   smallest eviction key. The keys pack into one int64,
   ``real << 62 | float_bits(acc) << 31 | (pos or slot)``, whose integer order is the
   lexicographic order above because a non-negative float's bits order like the float. The
   last program of ``bg`` to finish (an atomic ticket) takes the minimum over the chunks and
   writes the new entry into the victim's slot.
"""

import functools

import torch
import triton
import triton.language as tl

from .common import FMA, LOG2E, cdiv, dot_precision, next_power_of_2, online_softmax_step

BLOCK_N = 64
# Eviction key of an entry that may not leave (protected, or past the chunk), and "no slot".
NOT_A_CANDIDATE = tl.constexpr(2**63 - 1)
NO_SLOT = tl.constexpr(2**31 - 1)


@triton.jit
def _eviction_key(pos, acc, slot, next_pos, recent_budget, num_sink):
    """The packed eviction key of entries (smaller leaves first); protected -> int64 max."""
    real = pos >= 0
    protected = real & ((pos < num_sink) | (pos >= next_pos - recent_budget))
    acc_bits = acc.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(real, (1 << 62) | (acc_bits << 31) | pos.to(tl.int64), slot.to(tl.int64))
    return tl.where(protected, NOT_A_CANDIDATE, key)


@triton.jit
def _program(NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
             HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """What a program of the ``(B * Hkv, S)`` grid owns: ``bg`` and its sequence ``b`` and kv
    head ``g``, the rows ``r`` of the group's query heads and the columns ``d`` of a head, with
    their in-bounds masks (both are padded to powers of two, rows to at least 16 for tl.dot)."""
    bg = tl.program_id(0)
    b = (bg // NUM_KV_HEADS).to(tl.int64)  # storage offsets pass 2**31 at large B * C * D
    r = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM_P)
    return bg, b, bg % NUM_KV_HEADS, r, d, r < GROUP, d < HEAD_DIM


@triton.jit
def _scratch(SCRATCH, length, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
             HEAD_DIM_P: tl.constexpr):
    """The float32 scratch both launches share (one allocation, ``_scratch_size``): per program
    of the grid the partial ``m`` and ``l`` ``[GROUP_P]`` and ``o`` ``[GROUP_P, HEAD_DIM_P]``;
    per ``bg`` the logits ``[GROUP, length + 1]`` and the new entry's score."""
    parts = tl.num_programs(0) * tl.num_programs(1) * GROUP_P
    part_o = SCRATCH + 2 * parts
    logits = part_o + parts * HEAD_DIM_P
    new_acc = logits + tl.num_programs(0).to(tl.int64) * GROUP * (length + 1)
    return SCRATCH, SCRATCH + parts, part_o, logits, new_acc


def _scratch_size(programs, num_splits, group, group_p, head_dim_p, length):
    """Elements of ``_scratch`` for a grid of ``(programs, num_splits)``."""
    return programs * (num_splits * group_p * (2 + head_dim_p) + group * (length + 1) + 1)


@triton.jit
def _decode_partial(
    Q, K_NEW, V_NEW, K, V, POS, NEW_REAL, NEXT_POS, SCRATCH,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh,
    capacity, length, chunk, qk_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr,
    HAS_NEW_REAL: tl.constexpr, QK_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr,
):
    bg, b, g, r, d, r_ok, d_ok = _program(NUM_KV_HEADS, GROUP, GROUP_P, HEAD_DIM, HEAD_DIM_P)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    PART_M, PART_L, PART_O, LOGITS, _ = _scratch(SCRATCH, length, GROUP, GROUP_P, HEAD_DIM_P)

    q = tl.load(Q + b * stride_qb + (g * GROUP + r)[:, None] * stride_qh + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    o_i = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
    # This (b, g)'s first slot, 64-bit. Slot offsets stay 32-bit: they pass 2**31 only past
    # 2**31 / D slots a head, and 64-bit ones (row_tile) cost this loop 28 to 53 registers (ptxas).
    row = bg.to(tl.int64) * capacity
    k_base = K + row * HEAD_DIM
    v_base = V + row * HEAD_DIM
    pos_base = POS + row
    logit_base = LOGITS + (bg.to(tl.int64) * GROUP + r) * (length + 1)

    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    for start in range(lo, hi, BLOCK):
        n = start + tl.arange(0, BLOCK)
        n_ok = n < hi
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * HEAD_DIM + d[None, :], mask=kv_ok, other=0.0)
        pos = tl.load(pos_base + n, mask=n_ok, other=-1)
        s = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION) * qk_scale
        s = tl.where((pos >= 0)[None, :], s, float("-inf"))
        tl.store(logit_base[:, None] + n[None, :], s, mask=r_ok[:, None] & n_ok[None, :])
        v = tl.load(v_base + n[:, None] * HEAD_DIM + d[None, :], mask=kv_ok, other=0.0)
        m_i, l_i, o_i = online_softmax_step(m_i, l_i, o_i, s, v, PV_PRECISION)

    if split == num_splits - 1:
        # The new entry (index ``length``) comes from the new k/v, not from storage.
        k_new = tl.load(K_NEW + b * stride_knb + g * stride_knh + d, mask=d_ok, other=0.0)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
        if HAS_NEW_REAL:
            s_new = tl.where(tl.load(NEW_REAL + b) != 0, s_new, float("-inf"))
        tl.store(logit_base + length, s_new, mask=r_ok)
        m_new = tl.maximum(m_i, s_new)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_new = tl.exp2(s_new - m_safe)
        v_new = tl.load(V_NEW + b * stride_vnb + g * stride_vnh + d, mask=d_ok, other=0.0)
        l_i = l_i * alpha + p_new
        o_i = o_i * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new

    if (g == 0) & (split == 0):
        # T counts real tokens; the update kernel (stream-ordered after this one) reads it.
        step = 1
        if HAS_NEW_REAL:
            step = (tl.load(NEW_REAL + b) != 0).to(tl.int64)
        tl.store(NEXT_POS + b, tl.load(NEXT_POS + b) + step)

    part = bg * num_splits + split
    tl.store(PART_M + part * GROUP_P + r, m_i)
    tl.store(PART_L + part * GROUP_P + r, l_i)
    tl.store(PART_O + (part * GROUP_P + r)[:, None] * HEAD_DIM_P + d[None, :], o_i)


@triton.jit
def _decode_update(
    OUT, K_NEW, V_NEW, K, V, POS, SCORES, NEW_REAL, NEXT_POS, SCRATCH, CANDIDATES, TICKETS,
    stride_ob, stride_oh, stride_knb, stride_knh, stride_vnb, stride_vnh,
    capacity, length, chunk, budget, recent_budget, num_sink,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr,
    SPLITS_P: tl.constexpr, HAS_NEW_REAL: tl.constexpr,
):
    bg, b, g, r, d, r_ok, d_ok = _program(NUM_KV_HEADS, GROUP, GROUP_P, HEAD_DIM, HEAD_DIM_P)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    PART_M, PART_L, PART_O, LOGITS, NEW_ACC = _scratch(SCRATCH, length, GROUP, GROUP_P,
                                                       HEAD_DIM_P)
    # Each chunk's smallest eviction key and its slot, for the last program of ``bg``.
    CAND_KEY = CANDIDATES + bg * num_splits
    CAND_SLOT = CAND_KEY + tl.num_programs(0) * num_splits

    # Merge the chunks' (m, l) into the row log-sum-exp (base 2); every program needs it.
    sp = tl.arange(0, SPLITS_P)
    part_rows = (bg * num_splits + sp)[:, None] * GROUP_P + r[None, :]
    sp_ok = (sp < num_splits)[:, None]
    part_m = tl.load(PART_M + part_rows, mask=sp_ok, other=float("-inf"))
    part_l = tl.load(PART_L + part_rows, mask=sp_ok, other=0.0)
    m = tl.max(part_m, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(part_l * tl.exp2(part_m - m_safe[None, :]), 0)
    lse = tl.where(l_sum > 0, m_safe + tl.log2(l_sum), float("inf"))
    if HAS_NEW_REAL:
        # A pad's query, like a pad's key, adds nothing to any score: lse = inf makes p = 0.
        lse = tl.where(tl.load(NEW_REAL + b) != 0, lse, float("inf"))

    if split == 0:
        o = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
        for i in range(0, num_splits):
            part_row = (bg * num_splits + i) * GROUP_P + r
            w = tl.exp2(tl.load(PART_M + part_row) - m_safe)
            o += tl.load(PART_O + part_row[:, None] * HEAD_DIM_P + d[None, :]) * w[:, None]
        o = o / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(OUT + b * stride_ob + (g * GROUP + r)[:, None] * stride_oh + d[None, :],
                 o.to(OUT.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])

    next_pos = tl.load(NEXT_POS + b)
    new_pos = next_pos - 1
    if HAS_NEW_REAL:
        new_pos = tl.where(tl.load(NEW_REAL + b) != 0, new_pos, -1)
    logit_base = LOGITS + (bg.to(tl.int64) * GROUP + r) * (length + 1)
    row = bg.to(tl.int64) * capacity  # this (b, g)'s first slot in storage
    pos_base = POS + row
    score_base = SCORES + row

    best_key = tl.full([], NOT_A_CANDIDATE, tl.int64)
    best_slot = tl.full([], 0, tl.int32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    for start in range(lo, hi, BLOCK):
        n = start + tl.arange(0, BLOCK)
        n_ok = n < hi
        s = tl.load(logit_base[:, None] + n[None, :], mask=r_ok[:, None] & n_ok[None, :],
                    other=float("-inf"))
        acc = tl.load(score_base + n, mask=n_ok, other=0.0)
        acc += tl.sum(tl.exp2(s - lse[:, None]), 0)
        tl.store(score_base + n, acc, mask=n_ok)
        pos = tl.load(pos_base + n, mask=n_ok, other=0)
        key = _eviction_key(pos, acc, n, next_pos, recent_budget, num_sink)
        key = tl.where(n_ok, key, NOT_A_CANDIDATE)
        block_key = tl.min(key, 0)
        block_slot = tl.min(tl.where(key == block_key, n, NO_SLOT), 0)
        best_slot = tl.where(block_key < best_key, block_slot, best_slot)
        best_key = tl.minimum(block_key, best_key)

    if split == num_splits - 1:
        s_new = tl.load(logit_base + length, mask=r_ok, other=float("-inf"))
        acc_new = tl.sum(tl.exp2(s_new - lse), 0)
        tl.store(NEW_ACC + bg, acc_new)
        key_new = _eviction_key(new_pos, acc_new, length, next_pos, recent_budget, num_sink)
        best_slot = tl.where(key_new < best_key, length, best_slot)
        best_key = tl.minimum(key_new, best_key)

    tl.store(CAND_KEY + split, best_key)
    tl.store(CAND_SLOT + split, best_slot)
    # The last program of this (b, g) to take a ticket sees every chunk's scores and candidate:
    # the barrier orders all of this program's threads' stores before the (acq_rel) ticket.
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKETS + bg, 1)
    if ticket == num_splits - 1:
        sp_ok1 = sp < num_splits
        keys = tl.load(CAND_KEY + sp, mask=sp_ok1, other=NOT_A_CANDIDATE, volatile=True)
        slots = tl.load(CAND_SLOT + sp, mask=sp_ok1, other=NO_SLOT, volatile=True)
        victim = tl.min(tl.where(keys == tl.min(keys, 0), slots, NO_SLOT), 0)
        slot = tl.where(length < budget, length, victim)
        # Full and the new entry is its own victim (slot == length): it is not stored.
        if slot < tl.where(length < budget, length + 1, length):
            k_new = tl.load(K_NEW + b * stride_knb + g * stride_knh + d, mask=d_ok)
            v_new = tl.load(V_NEW + b * stride_vnb + g * stride_vnh + d, mask=d_ok)
            entry = row + slot
            tl.store(K + entry * HEAD_DIM + d, k_new.to(K.dtype.element_ty), mask=d_ok)
            tl.store(V + entry * HEAD_DIM + d, v_new.to(V.dtype.element_ty), mask=d_ok)
            tl.store(POS + entry, new_pos)
            tl.store(SCORES + entry, tl.load(NEW_ACC + bg, volatile=True))
        tl.store(TICKETS + bg, 0)


def _partial_launch(keys, head_dim_p):
    """``num_warps`` and ``num_stages`` of the partial pass: three key/value blocks in flight,
    one for fp32 at D = 256, where Triton 3.8 needs 238,080 B of shared memory for two (over
    the H100's 232,448); eight warps for fp32 from D = 128, where four run out of registers
    (tests/kernels checks both)."""
    fp32 = keys.element_size() == 4
    return dict(num_warps=8 if fp32 and head_dim_p >= 128 else 4,
                num_stages=1 if fp32 and head_dim_p >= 256 else 3)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    # Read once per GPU: the decode step runs per token and layer.
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(device, programs, length):
    """Chunks per (sequence, kv head): about two programs per SM, at least a block each."""
    blocks = cdiv(length + 1, BLOCK_N)
    if device.type == "cuda":
        target = 2 * _sm_count(device.index)
    else:
        target = 4  # the interpreter: a few chunks, so the merge path always runs
    return max(1, min(blocks, cdiv(target, programs)))


def h2o_decode_fwd(query, key_new, value_new, keys, values, positions, scores, next_position,
                   length, budget, recent_budget, num_sink, softmax_scale, *, new_real=None,
                   out=None, tickets=None, num_splits=None):
    """Launches the two decode kernels; updates the stored entries in place.

    Args:
        query: ``[B, Hq, D]``; key_new, value_new: ``[B, Hkv, D]`` (copied when the last dim
            is strided).
        keys, values: ``[B, Hkv, C, D]`` contiguous storage, ``C > length`` unless
            ``length == budget``.
        positions: ``[B, Hkv, C]`` int64 (``-1`` = pad); scores: ``[B, Hkv, C]`` float32; both
            contiguous.
        next_position: ``[B]`` int64, real tokens seen before this step; advanced in place.
        length: stored entries (same for every sequence and head), ``<= budget``.
        new_real: optional ``[B]`` bool/int, 0 where the new token is a pad.
        out: optional ``[B, Hq, D]`` destination with a contiguous last dim (may be a view).
        tickets: optional ``[B * Hkv]`` int32 zeros, reused across calls (the kernel leaves
            them at zero); allocated when ``None``.
        num_splits: chunks per (sequence, kv head); default from the SM count.

    Returns:
        ``out``, the attention output in ``query``'s dtype.
    """
    storage = (keys, values, positions, scores)
    if not all(t.is_contiguous() for t in storage):
        raise ValueError("keys, values, positions and scores must be contiguous storage "
                         "(an H2OState's buffers are)")
    if out is not None and out.stride(-1) != 1:
        raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    query, key_new, value_new = (t if t.stride(-1) == 1 else t.contiguous()
                                 for t in (query, key_new, value_new))
    batch, num_heads, head_dim = query.shape
    num_kv_heads, capacity = keys.shape[1:3]
    group = num_heads // num_kv_heads
    programs = batch * num_kv_heads
    if num_splits is None:
        num_splits = _num_splits(query.device, programs, length)
    chunk = cdiv(cdiv(max(length, 1), num_splits), BLOCK_N) * BLOCK_N
    num_splits = max(1, cdiv(length, chunk))
    group_p = max(16, next_power_of_2(group))
    head_dim_p = max(16, next_power_of_2(head_dim))

    scratch = torch.empty(_scratch_size(programs, num_splits, group, group_p, head_dim_p, length),
                          device=query.device, dtype=torch.float32)
    candidates = torch.empty(2 * programs * num_splits, device=query.device, dtype=torch.int64)
    if tickets is None:
        tickets = torch.zeros(programs, device=query.device, dtype=torch.int32)
    if out is None:
        out = torch.empty_like(query)
    has_new_real = new_real is not None
    if has_new_real:  # the kernels read flag b at NEW_REAL + b; a column mask[:, t] is strided
        new_real = new_real.contiguous()
        if new_real.dtype == torch.bool:
            new_real = new_real.view(torch.uint8)
    new_real_arg = new_real if has_new_real else next_position  # never read without the flag
    grid = (programs, num_splits)
    meta = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim,
                HEAD_DIM_P=head_dim_p, BLOCK=BLOCK_N, HAS_NEW_REAL=has_new_real, **FMA)
    new_strides = (*key_new.stride()[:2], *value_new.stride()[:2])

    _decode_partial[grid](
        query, key_new, value_new, keys, values, positions, new_real_arg, next_position, scratch,
        *query.stride()[:2], *new_strides, capacity, length, chunk, softmax_scale * LOG2E.value,
        QK_PRECISION=dot_precision(query.dtype), PV_PRECISION=dot_precision(values.dtype),
        **_partial_launch(keys, head_dim_p), **meta,
    )
    _decode_update[grid](
        out, key_new, value_new, keys, values, positions, scores, new_real_arg, next_position,
        scratch, candidates, tickets,
        *out.stride()[:2], *new_strides, capacity, length, chunk, budget, recent_budget, num_sink,
        SPLITS_P=next_power_of_2(num_splits), **meta,
    )
    return out
