"""SF-Attn's own argument rules (pattern, mode, kernel limits; the tensor checks are in
``sinklora._checks``) and the checked parameters they resolve to, shared by every entry point
(reference, fallback, kernels)."""
from dataclasses import dataclass

from .._checks import check_attention_inputs, check_int, check_softmax_scale
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
    return check_int("num_sink", num_sink, minimum=0)


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_args(q, k, v, group_size, num_sink, shift_heads, mode, softmax_scale):
    """Validates the SF-Attn arguments and returns them resolved (defaults filled in)."""
    check_attention_inputs(("q", "k", "v"), (q, k, v), "B, H, N, D")
    (b, hq, n, d), hkv = q.shape, k.shape[1]
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
