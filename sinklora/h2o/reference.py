"""H2O in plain PyTorch, the path for CPU tensors and the reference the kernels are tested with:
the twins of ``sinklora/kernels/h2o_*.py`` in whole-tensor ops over batch, heads and entries, on
``policy.py``'s selection; float64 inputs give a reference. Prefill walks the prompt in query
chunks, so memory is ``O(chunk * n)``, never ``n x n``."""
import torch

from .policy import decode_victim

PREFILL_QUERY_CHUNK = 512


def _masked_softmax(logits, visible):
    """Softmax over the last dim where ``visible``; a row that sees nothing is all zeros."""
    logits = logits.masked_fill(~visible, float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(logits - row_max)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def prefill_torch(query, key, value, real, softmax_scale, out=None):
    """Causal attention over the prompt and the per-kv-head column sums of its probabilities.

    query ``[B, Hq, n, D]``, key/value ``[B, Hkv, n, D]``, real ``[B, n]`` bool or ``None``.
    Returns ``(out [B, n, Hq, D] in query's dtype, acc [B, Hkv, n])``; pad keys are never
    attended and pad queries add nothing to ``acc``.
    """
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    ct = torch.promote_types(query.dtype, torch.float32)  # float64 stays
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


def decode_torch(query, state, key, value, new_real, budget, softmax_scale, out=None):
    """One decode step (spec "Decode" 1-3) on ``state``'s buffers in place; returns the output.

    query ``[B, Hq, D]``, key/value ``[B, Hkv, D]``, new_real ``[B]`` bool or ``None``. The new
    entry goes to slot ``length`` while there is room, else into the victim's slot (or nowhere
    when it is the victim itself). As the Triton decode, it writes the entries and
    ``next_position`` and leaves ``length`` and the capacity to :meth:`H2OState.begin_step` /
    :meth:`H2OState.end_step`.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    length = state.length
    ct = torch.promote_types(query.dtype, torch.float32)  # float64 stays

    real = torch.ones_like(state.next_position, dtype=torch.bool) if new_real is None else new_real
    new_pos = torch.where(real, state.next_position, -1)[:, None, None]
    state.next_position += real.long()
    positions = torch.cat([state.positions, new_pos.expand(batch, num_kv_heads, 1)], 2)

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
    # A pad's query, like a pad's key, adds nothing to any score.
    scores += (p.sum(2) * real[:, None, None]).to(scores.dtype)

    if length < budget.total:
        slot = torch.full((batch, num_kv_heads), length, device=query.device)
        stays = torch.ones_like(slot, dtype=torch.bool)
    else:
        victim = decode_victim(positions, scores, state.next_position, budget)
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
