"""Hugging Face transformers glue: the ``"sinklora"`` attention and mask functions.

Registered with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` when
``sinklora`` is imported. The mask function hands attention the 2-D padding mask
``[B, kv_len]`` (or ``None`` when nothing is padded), never an ``N x N`` mask.

The attention function dispatches, per call:
1. an ``H2OCache`` bound to this layer -> H2O prefill / decode (``sinklora.h2o``);
2. module in training mode, no cache -> SF-Attn (``sinklora.sf_attention``);
3. otherwise -> full causal attention (SDPA).
"""
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

ATTN_NAME = "sinklora"


def sinklora_attention_forward(module, query, key, value, attention_mask, scaling=None,
                               dropout=0.0, **kwargs):
    from . import h2o

    out = h2o.maybe_attention(module, query, key, value, attention_mask, scaling)
    if out is not None:
        return out, None
    # TODO(glue issue): SF-Attn in training mode, padding and packing.
    return sdpa_attention_forward(module, query, key, value, _sdpa_mask(attention_mask, query),
                                  dropout=dropout, scaling=scaling, **kwargs)


def _sdpa_mask(padding_mask, query):
    """2-D padding mask -> the boolean 4-D mask SDPA wants (short sequences only)."""
    if padding_mask is None:
        return None
    q_len, kv_len = query.shape[-2], padding_mask.shape[-1]
    causal = padding_mask.new_ones(q_len, kv_len).tril(kv_len - q_len)
    return causal[None, None] & padding_mask[:, None, None, :].bool()


AttentionInterface.register(ATTN_NAME, sinklora_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
