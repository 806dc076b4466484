"""SF-Attn in plain PyTorch, for CPU tensors and as a readable second implementation.

Heads of one kind (unshifted or shifted) share their group boundaries, so each group is one
small dense attention: the group's queries against its sink keys, its own keys and (``"s2"``
only) the wrapped keys. The mask inside a group is at most ``G x (S + 1.5 G)``; nothing of size
``N x N`` is built, so time and memory are ``O(N * (G + S))``. Autograd differentiates it.
"""
import torch

from ..kernels.pattern import plain


def _group_bounds(p, shift):
    """``[(start, end), ...]`` of the groups of a head with this shift."""
    bounds, start = [], 0
    while start < p.seq_len:
        end = plain.group_end(start, p.group_size, shift, p.seq_len)
        bounds.append((start, end))
        start = end
    return bounds


def _heads_attention(q, k, v, kv_idx, p, shift):
    """q ``[B, h, N, D]``: heads of one kind; ``kv_idx[h]`` is the k/v head each one reads."""
    n = p.seq_len
    acc = torch.promote_types(q.dtype, torch.float32)
    wrap_from = p.wrap_from(shift)
    outs = []
    for start, end in _group_bounds(p, shift):
        num_sink = min(p.num_sink, start)
        wrap = wrap_from if start < shift else n  # only the first shifted group of "s2" wraps
        key_idx = torch.cat([
            torch.arange(num_sink, device=q.device),
            torch.arange(start, end, device=q.device),
            torch.arange(wrap, n, device=q.device),
        ])
        i = torch.arange(start, end, device=q.device)[:, None]
        mask = plain.visible(i, key_idx[None, :], p.group_size, shift, p.num_sink, wrap_from, n)
        # Gather the group's keys first, then expand heads: only a group's worth is copied.
        kg = k.index_select(2, key_idx).index_select(1, kv_idx).to(acc)
        vg = v.index_select(2, key_idx).index_select(1, kv_idx).to(acc)
        scores = (q[:, :, start:end].to(acc) @ kg.transpose(-1, -2)) * p.softmax_scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append((probs @ vg).to(q.dtype))
    return torch.cat(outs, dim=2)


def sf_attention_torch(q, k, v, p):
    """SF-Attn on checked params ``p``; differentiable through autograd."""
    rep = p.num_heads // p.num_kv_heads
    split = p.num_heads - p.shift_heads
    outs = []
    for heads in (range(0, split), range(split, p.num_heads)):
        if len(heads) == 0:
            continue
        kv_idx = torch.tensor([h // rep for h in heads], device=q.device)
        outs.append(_heads_attention(q[:, heads.start:heads.stop], k, v, kv_idx, p,
                                     p.shift(heads.start)))
    return torch.cat(outs, dim=1)
