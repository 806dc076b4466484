"""The ``"sinklora"`` attention, registered with transformers when ``sinklora.hf`` is imported,
with a mask function that hands it the 2-D padding mask ``[B, kv_len]`` (or ``None`` when
nothing is padded), never an ``N x N`` mask.

The attention function dispatches, per call:
1. an ``H2OCache`` bound to this layer -> H2O prefill / decode (``sinklora.h2o``);
2. module in training mode, keys are exactly this call's tokens -> SF-Attn
   (``sinklora.sf_attention``, Triton kernels on CUDA, the PyTorch fallback elsewhere);
3. otherwise -> full causal attention (SDPA); after cached keys, queries attend to the keys
   up to their own position (a ``q_len x kv_len`` bool mask when there are several queries).

In cases 2 and 3 without cached keys, a padded or packed batch is attended per document
(``documents``). ``"sinklora_reference"`` is the same model with the spec's dense float64
SF-Attn (builds ``N x N``; for tests and the demo only).
"""
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..sf_attn import sf_attention, sf_attention_reference
from .cache import bound_layer
from .documents import attend_per_document, restarts
from .settings import ATTN_NAME, REFERENCE_ATTN_NAME, group_size_for, settings_of


def sinklora_attention_forward(module, query, key, value, attention_mask, scaling=None,
                               dropout=0.0, **kwargs):
    """The ``"sinklora"`` attention function (see the module docstring for the dispatch).

    query ``[B, Hq, q_len, D]``, key/value ``[B, Hkv, kv_len, D]`` (RoPE applied, GQA not
    expanded), ``attention_mask`` the 2-D bool padding mask ``[B, kv_len]`` or ``None``.
    Returns ``([B, q_len, Hq, D], None)``.
    """
    layer = bound_layer(key)
    q_len, kv_len = query.shape[2], key.shape[2]
    try:
        # An H2OCache hands over only the new keys; the window applies to every key seen.
        _check_call(module, query, kv_len, attention_mask, kwargs.get("softcap"),
                    kwargs.get("sliding_window"), kv_len if layer is None else layer.seen)
    except ValueError:
        if layer is not None:
            layer.cancel()
        raise
    if layer is not None:
        return layer.attend(query, attention_mask, scaling), None
    if attention_mask is not None and attention_mask.shape[-1] < kv_len:
        # A static cache hands back all its slots; the mask covers the filled ones.
        kv_len = attention_mask.shape[-1]
        key, value = key[:, :, :kv_len], value[:, :, :kv_len]
    position_ids = kwargs.get("position_ids")
    if q_len == kv_len:
        query, key, value = _same_dtype(query, key, value)
        if module.training:
            settings = settings_of(module)
            if dropout:
                raise ValueError(f"SF-Attn has no attention dropout; set the config's "
                                 f"attention_dropout to 0 (got {dropout})")
            group_size = group_size_for(settings, q_len)

            def attend(q, k, v):
                return sf_attention(q, k, v, group_size=group_size, num_sink=settings["num_sink"],
                                    shift_heads=settings["shift_heads"], mode=settings["mode"],
                                    softmax_scale=scaling).transpose(1, 2)
        else:
            def attend(q, k, v):
                return sdpa_attention_forward(module, q, k, v, None, dropout=dropout,
                                              scaling=scaling)[0]
        return attend_per_document(attend, query, key, value, attention_mask, position_ids), None
    if q_len > 1 and position_ids is not None and restarts(position_ids).any():
        raise ValueError("packed sequences (position_ids restarting) are supported only without "
                         "cached keys; run packed batches without a cache")
    return sdpa_attention_forward(module, query, key, value,
                                  _sdpa_mask(attention_mask, query, kv_len),
                                  dropout=dropout, scaling=scaling, **kwargs)


def _check_call(module, query, kv_len, attention_mask, softcap, sliding_window, keys):
    """What the sinklora attention cannot compute is refused, never approximated."""
    if getattr(module, "is_causal", True) is False:
        raise ValueError(f"sinklora attention is causal; {type(module).__name__} is not "
                         "(is_causal=False): use it with decoder-only models")
    if softcap is not None:
        raise ValueError(f"sinklora attention has no logit soft-capping: this layer has "
                         f"softcap={softcap} (e.g. Gemma 2's attn_logit_softcapping); use a "
                         "model without it")
    if attention_mask is not None:
        q_len = query.shape[2]
        # Shorter than the keys only for a static cache's unfilled slots, never than the queries.
        if (attention_mask.dim() != 2 or attention_mask.shape[0] != query.shape[0]
                or not q_len <= attention_mask.shape[1] <= kv_len):
            raise ValueError(f"sinklora attention takes the 2-D padding mask [B, kv_len] = "
                             f"[{query.shape[0]}, {kv_len}], got an attention_mask of shape "
                             f"{tuple(attention_mask.shape)}; pass attention_mask [B, N] for "
                             "input_ids [B, N] (and position_ids for packed documents)")
    if sliding_window is not None and keys > sliding_window:
        raise ValueError(f"sinklora attention has no sliding window: this layer has "
                         f"sliding_window={sliding_window} < {keys} keys; use a model without one")


def _same_dtype(query, key, value):
    """q, k, v in the autocast dtype when autocast is on (RoPE in fp32 may have promoted q and k
    but not v), else in query's dtype."""
    device = query.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else query.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _sdpa_mask(padding_mask, query, kv_len):
    """The boolean 4-D mask SDPA wants for queries after cached keys: the last ``q_len`` of
    ``kv_len`` positions, each seeing the keys up to its own, pads excluded (``q_len x kv_len``;
    ``None`` for one unpadded query). SDPA's own ``is_causal`` aligns the queries with the
    first keys instead, which is wrong as soon as more than one query follows cached keys."""
    q_len = query.shape[-2]
    if padding_mask is None and q_len == 1:
        return None
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if padding_mask is None:
        return causal[None, None]
    return causal[None, None] & padding_mask[:, None, None, :].bool()


def reference_attention_forward(module, query, key, value, attention_mask, scaling=None,
                                dropout=0.0, **kwargs):
    """The ``"sinklora_reference"`` attention: SF-Attn by the spec's dense mask, in float64,
    training or not, with the settings and group size rule of ``"sinklora"``. Builds
    ``[Hq, N, N]``: for tests and the demo only. Unpadded, unpacked batches only."""
    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or query.shape[2] != key.shape[2]
            or (position_ids is not None and restarts(position_ids).any())):
        raise ValueError("the reference attention takes unpadded, unpacked batches without "
                         "cached keys")
    settings = settings_of(module)
    out = sf_attention_reference(
        query, key, value, group_size=group_size_for(settings, query.shape[2]),
        num_sink=settings["num_sink"], shift_heads=settings["shift_heads"],
        mode=settings["mode"], softmax_scale=scaling)
    return out.to(query.dtype).transpose(1, 2), None


def padding_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """The mask function: transformers' 2-D padding mask, sliced to the last ``kv_length``
    positions as for flash attention, after checking that it is ``[B, kv_len]`` (transformers
    would index a mis-shaped one without a word)."""
    if attention_mask is not None and (attention_mask.dim() != 2
                                       or attention_mask.shape[0] != batch_size
                                       or attention_mask.shape[1] < q_length):
        raise ValueError(f"attention_mask must be 2-D [batch, tokens seen] = [{batch_size}, "
                         f">= {q_length}] for sinklora attention, got shape "
                         f"{tuple(attention_mask.shape)}")
    return flash_attention_mask(batch_size, q_length, kv_length, *args,
                                attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ATTN_NAME, sinklora_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, padding_mask)
AttentionInterface.register(REFERENCE_ATTN_NAME, reference_attention_forward)
AttentionMaskInterface.register(REFERENCE_ATTN_NAME, padding_mask)
