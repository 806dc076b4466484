"""The Triton SF-Attn as ``torch.library`` custom ops, so ``torch.compile`` traces through it
without a graph break: ``sinklora::sf_attn_fwd`` returns ``(o, lse)``, ``sinklora::sf_attn_bwd``
returns ``(dq, dk, dv)``, each with a fake-tensor rule, and autograd links the two."""
import torch

from ..kernels.sf_attn import sf_attn_backward, sf_attn_forward


@torch.library.custom_op("sinklora::sf_attn_fwd", mutates_args=())
def sf_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                num_sink: int, shift_heads: int, is_s2: bool, softmax_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return sf_attn_forward(q, k, v, group_size, num_sink, shift_heads, is_s2, softmax_scale)


@sf_attn_fwd.register_fake
def _(q, k, v, group_size, num_sink, shift_heads, is_s2, softmax_scale):
    bsz, num_heads, n, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (bsz, num_heads, n), dtype=torch.float32)


@torch.library.custom_op("sinklora::sf_attn_bwd", mutates_args=())
def sf_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                o: torch.Tensor, lse: torch.Tensor, group_size: int, num_sink: int,
                shift_heads: int, is_s2: bool, softmax_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sf_attn_backward(do, q, k, v, o, lse, group_size, num_sink, shift_heads, is_s2,
                            softmax_scale)


@sf_attn_bwd.register_fake
def _(do, q, k, v, o, lse, group_size, num_sink, shift_heads, is_s2, softmax_scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, *ctx.pattern = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = sf_attn_bwd(do, q, k, v, o, lse, *ctx.pattern)
    return (dq, dk, dv) + (None,) * len(ctx.pattern)


sf_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def sf_attention_triton(q, k, v, p):
    """SF-Attn through the Triton kernels on checked params ``p``."""
    o, _ = sf_attn_fwd(q, k, v, p.group_size, p.num_sink, p.shift_heads, p.mode == "s2",
                       p.softmax_scale)
    return o
