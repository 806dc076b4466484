"""H2O in plain PyTorch: the path for CPU tensors and the reference the kernels are tested with.

The same algorithm as ``sinklora/kernels/h2o_*.py`` (see ``docs/spec/h2o.md``), written with
whole-tensor ops over batch, heads and entries; run it on float64 inputs for a reference.
Prefill walks the prompt in query chunks, so memory is ``O(chunk * n)``, never ``n x n``.
"""
import torch

PREFILL_QUERY_CHUNK = 512


def compute_dtype(dtype):
    """Softmax and scores in float32, or float64 when the inputs are float64."""
    return torch.promote_types(dtype, torch.float32)


def _masked_softmax(logits, visible):
    """Softmax over the last dim where ``visible``; a row that sees nothing is all zeros."""
    logits = logits.masked_fill(~visible, float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(logits - row_max)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def real_positions(real, seq_len, batch, device):
    """``(positions [B, n], next_position [B])``: index among the sequence's real tokens, -1 for
    pads, and the number of real tokens; ``real`` is ``[B, n]`` bool or ``None``."""
    if real is None:
        positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
        return positions, torch.full((batch,), seq_len, device=device, dtype=torch.long)
    counts = real.long().cumsum(-1)
    return torch.where(real, counts - 1, -1), counts[:, -1].clone()


def prefill_torch(query, key, value, real, softmax_scale, out=None):
    """Causal attention over the prompt and the per-kv-head column sums of its probabilities.

    query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]``, real ``[B, n]`` bool or ``None``.
    Returns ``(out [B, n, Hq, D] in query's dtype, acc [B, Hkv, n])``; pad keys are never
    attended and pad queries add nothing to ``acc``.
    """
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    ct = compute_dtype(query.dtype)
    q = query.reshape(batch, num_kv_heads, group, seq_len, head_dim).to(ct)
    k, v = key.to(ct), value.to(ct)
    if out is None:
        out = query.new_empty(batch, seq_len, num_heads, head_dim)
    acc = torch.zeros(batch, num_kv_heads, seq_len, device=query.device, dtype=ct)
    j = torch.arange(seq_len, device=query.device)
    for start in range(0, seq_len, PREFILL_QUERY_CHUNK):
        i = j[start:start + PREFILL_QUERY_CHUNK]
        logits = torch.einsum("bgrid,bgjd->bgrij", q[:, :, :, i], k) * softmax_scale
        visible = (j[None, :] <= i[:, None])[None, None, None]
        if real is not None:
            visible = visible & real[:, None, None, None, :]
        p = _masked_softmax(logits, visible)
        o = torch.einsum("bgrij,bgjd->bigrd", p, v)
        out[:, i] = o.reshape(batch, len(i), num_heads, head_dim).to(out.dtype)
        if real is not None:
            p = p * real[:, None, None, i, None]
        acc += p.sum((2, 3))
    return out, acc


def eviction_keys(positions, scores, next_position, budget, slots):
    """Who leaves first: ``(primary, secondary)``, smaller first, compared lexicographically.

    Pads (position -1) have primary -1 and go first, by slot; real candidates have their score,
    ties to the smaller position; protected entries (sinks ``pos < num_sink`` and the
    ``recent_budget`` newest positions) have primary ``+inf`` and never leave.
    positions/scores ``[B, Hkv, N]``, next_position ``[B]`` (real tokens seen), slots ``[N]``.
    """
    real = positions >= 0
    newest = (next_position - budget.recent_budget)[:, None, None]
    protected = real & ((positions < budget.num_sink) | (positions >= newest))
    primary = torch.where(real, scores, torch.full_like(scores, -1.0))
    primary = primary.masked_fill(protected, float("inf"))
    secondary = torch.where(real, positions, slots.expand_as(positions))
    return primary, secondary


def prefill_keep(acc, positions, next_position, budget):
    """Slots ``[B, Hkv, K]`` (ascending) kept after prefill, ``K = min(n, budget.total)``: the
    protected entries plus the best candidates, i.e. all but the ``n - total`` that
    :func:`eviction_keys` would evict first."""
    batch, num_kv_heads, seq_len = acc.shape
    slots = torch.arange(seq_len, device=acc.device)
    if seq_len <= budget.total:
        return slots.expand(batch, num_kv_heads, seq_len)
    positions = positions[:, None].expand(batch, num_kv_heads, seq_len)
    primary, secondary = eviction_keys(positions, acc, next_position, budget, slots)
    by_secondary = secondary.argsort(dim=-1, stable=True)
    order = by_secondary.gather(-1, primary.gather(-1, by_secondary).argsort(dim=-1, stable=True))
    return order[..., seq_len - budget.total:].sort(-1).values


def decode_torch(query, state, key, value, new_real, budget, softmax_scale, out=None):
    """One decode step (spec "Decode" 1-3) on ``state`` in place; returns the output.

    query ``[B, Hq, D]``, key/value ``[B, Hkv, D]``, new_real ``[B]`` bool or ``None``. The new
    entry goes to slot ``length`` while there is room, else into the victim's slot (or nowhere
    when it is the victim itself).
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    length = state.length
    ct = compute_dtype(query.dtype)

    if new_real is None:
        new_pos = state.next_position.clone()
        state.next_position += 1
    else:
        new_pos = torch.where(new_real, state.next_position, -1)
        state.next_position += new_real.long()
    positions = torch.cat([state.positions, new_pos[:, None, None].expand(batch, num_kv_heads, 1)], 2)

    # The new entry is kept apart from the stored ones so that nothing of size L is copied.
    q = query.reshape(batch, num_kv_heads, group, head_dim).to(ct)
    logits = torch.cat([torch.einsum("bgrd,bgnd->bgrn", q, state.keys.to(ct)),
                        torch.einsum("bgrd,bgd->bgr", q, key.to(ct))[..., None]], -1)
    p = _masked_softmax(logits * softmax_scale, (positions >= 0)[:, :, None])
    o = (torch.einsum("bgrn,bgnd->bgrd", p[..., :length], state.values.to(ct))
         + p[..., length:] * value.to(ct)[:, :, None])
    o = o.reshape(batch, num_heads, head_dim)
    if out is None:
        out = query.new_empty(batch, num_heads, head_dim)
    out.copy_(o)
    scores = torch.cat([state.scores, state.scores.new_zeros(batch, num_kv_heads, 1)], 2)
    gained = p.sum(2)
    if new_real is not None:  # a pad's query, like a pad's key, adds nothing to any score
        gained = gained * new_real[:, None, None]
    scores += gained.to(scores.dtype)

    if length < budget.total:
        state.reserve(length + 1, budget.total)
        slot = torch.full((batch, num_kv_heads), length, device=query.device)
        stays = torch.ones_like(slot, dtype=torch.bool)
        state.length = length + 1
    else:
        slots = torch.arange(length + 1, device=query.device)
        primary, secondary = eviction_keys(positions, scores, state.next_position, budget, slots)
        ties = primary == primary.amin(-1, keepdim=True)
        victim = torch.where(ties, secondary, torch.iinfo(secondary.dtype).max).argmin(-1)
        stays = victim < length  # else the new entry is its own victim and is dropped
        slot = victim.clamp(max=length - 1)
    state.scores[:, :, :length] = scores[:, :, :length]
    b = torch.arange(batch, device=query.device)[:, None]
    g = torch.arange(num_kv_heads, device=query.device)[None, :]
    for buffer, new in ((state.key_buffer, key), (state.value_buffer, value),
                        (state.position_buffer, positions[:, :, length]),
                        (state.score_buffer, scores[:, :, length])):
        keep = stays.view(*stays.shape, *([1] * (new.dim() - 2)))
        buffer[b, g, slot] = torch.where(keep, new.to(buffer.dtype), buffer[b, g, slot])
    return out
