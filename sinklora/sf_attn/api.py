"""``sf_attention``: the public entry point; picks the Triton op or the PyTorch fallback."""
from .._checks import resolve_backend
from .fallback import sf_attention_torch
from .op import sf_attention_triton
from .params import check_args, check_kernel_args


def sf_attention(q, k, v, *, group_size, num_sink=4, shift_heads=None, mode="sf",
                 softmax_scale=None, backend="auto"):
    """Sink Fixed Attention (SinkLoRA): causal attention inside token groups, half the heads on
    groups shifted by half a group (no wrap-around), every query also seeing the first
    ``num_sink`` tokens.

    Args:
        q: ``[B, Hq, N, D]``, RoPE applied.
        k, v: ``[B, Hkv, N, D]`` with ``Hq % Hkv == 0`` (GQA; never expanded by the kernels).
        group_size: tokens per group ``G``, even, ``>= 2`` (LongLoRA uses ``N // 4``).
        num_sink: leading "sink" tokens every query sees (causally). SinkLoRA uses 4.
        shift_heads: how many of the LAST query heads use shifted groups; default ``Hq // 2``
            (LongLoRA shifts ``Hq - Hq // 2``, the same for even ``Hq``).
        mode: ``"sf"`` (SinkLoRA) or ``"s2"`` (LongLoRA's S2-Attn with its wrap-around,
            needs ``N % group_size == 0``), for comparisons.
        softmax_scale: default ``1 / sqrt(D)``.
        backend: ``"triton"`` (kernels; on CPU tensors only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (fallback), ``"auto"`` (Triton on CUDA, fallback elsewhere).

    Returns:
        ``[B, Hq, N, D]`` in ``q``'s dtype, differentiable in q, k, v.
    """
    p = check_args(q, k, v, group_size, num_sink, shift_heads, mode, softmax_scale)
    if resolve_backend(backend, q, "q/k/v") == "torch":
        return sf_attention_torch(q, k, v, p)
    check_kernel_args(p)
    return sf_attention_triton(q, k, v, p)
