"""Dense SF-Attn reference: an explicit boolean mask and a float64 softmax.

For tests and documentation only: it builds ``[Hq, N, N]``, which is exactly what the rest of
the package exists to avoid.
"""
import torch

from .._checks import check_int
from .params import check_args
from ..kernels.pattern import plain


def dense_mask(seq_len, num_heads, *, group_size, num_sink=4, shift_heads=None, mode="sf",
               device=None):
    """The SF-Attn pattern as ``[num_heads, seq_len, seq_len]`` bool: ``mask[h, i, j]`` is True
    when query ``i`` of head ``h`` sees key ``j``. The pattern arguments are
    :func:`~sinklora.sf_attention`'s, with the same defaults and checks; the mask is made on
    ``device`` (default: the CPU)."""
    seq_len = check_int("seq_len", seq_len, minimum=1)
    num_heads = check_int("num_heads", num_heads, minimum=1)
    shape = torch.empty(1, num_heads, seq_len, 1, device="meta")  # a shape without data
    return _mask(check_args(shape, shape, shape, group_size, num_sink, shift_heads, mode, None),
                 device)


def _mask(p, device):
    i = torch.arange(p.seq_len, device=device)[:, None]
    j = torch.arange(p.seq_len, device=device)[None, :]
    masks = []
    for h in range(p.num_heads):
        shift = p.shift(h)
        masks.append(
            plain.visible(i, j, p.group_size, shift, p.num_sink, p.wrap_from(shift), p.seq_len)
        )
    return torch.stack(masks)


def sf_attention_reference(q, k, v, *, group_size, num_sink=4, shift_heads=None, mode="sf",
                           softmax_scale=None):
    """SF-Attn computed densely in float64; returns float64 ``[B, Hq, N, D]``."""
    p = check_args(q, k, v, group_size, num_sink, shift_heads, mode, softmax_scale)
    rep = p.num_heads // p.num_kv_heads
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(rep, dim=1)
    v64 = v64.repeat_interleave(rep, dim=1)
    scores = (q64 @ k64.transpose(-1, -2)) * p.softmax_scale
    scores = scores.masked_fill(~_mask(p, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v64
