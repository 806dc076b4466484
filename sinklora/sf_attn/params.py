"""Argument checking shared by every SF-Attn entry point (reference, fallback, kernels)."""
from dataclasses import dataclass

import torch

from .._checks import check_int, check_softmax_scale
from ..kernels.pattern import plain

MODES = ("sf", "s2")
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SFParams:
    batch: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    head_dim: int
    group_size: int
    num_sink: int
    shift_heads: int
    mode: str
    softmax_scale: float

    def shift(self, head):
        """0 for an unshifted query head, group_size // 2 for a shifted one."""
        return plain.head_shift(head, self.num_heads, self.shift_heads, self.group_size)

    def wrap_from(self, shift):
        return plain.wrap_start(shift, self.seq_len, int(self.mode == "s2"))


def check_group_size(group_size):
    group_size = check_int("group_size", group_size)
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size}")
    return group_size


def check_num_sink(num_sink):
    num_sink = check_int("num_sink", num_sink)
    if num_sink < 0:
        raise ValueError(f"num_sink must be >= 0, got {num_sink}")
    return num_sink


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_args(q, k, v, group_size, num_sink, shift_heads, mode, softmax_scale):
    """Validates the SF-Attn arguments and returns them resolved (defaults filled in)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, n, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(
            f"k must be [B, Hkv, N, D] = [{b}, Hkv, {n}, {d}] to match q, got {tuple(k.shape)}"
        )
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if n == 0 or d == 0 or b == 0:
        raise ValueError(f"q must be non-empty, got shape {tuple(q.shape)}")

    group_size = check_group_size(group_size)
    # Sinks past the sequence change nothing; clamped so no buffer is sized by them.
    num_sink = min(check_num_sink(num_sink), n)
    check_mode(mode)
    if shift_heads is None:
        shift_heads = hq // 2
    shift_heads = check_int("shift_heads", shift_heads)
    if not 0 <= shift_heads <= hq:
        raise ValueError(f"shift_heads must be in [0, {hq}] (number of q heads), got {shift_heads}")
    if mode == "s2" and n % group_size:
        raise ValueError(
            f'mode="s2" needs the sequence length ({n}) to be a multiple of group_size '
            f'({group_size}), as LongLoRA does; use mode="sf" for any length'
        )
    # Groups of 2N or more hold the whole sequence in every head, shifted ones too: clamped so
    # that no index arithmetic meets a huge G (2**63 would overflow int64).
    group_size = min(group_size, 2 * n)
    return SFParams(b, hq, hkv, n, d, group_size, num_sink, shift_heads, mode,
                    check_softmax_scale(softmax_scale, d))


def check_kernel_args(p):
    """What the Triton kernels can take, beyond the pattern's own rules and the dtypes
    (``resolve_backend``)."""
    if p.head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"backend='triton' supports head dims {KERNEL_HEAD_DIMS}, got D={p.head_dim}; "
            "use backend='torch' for other sizes"
        )
