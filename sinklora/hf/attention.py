"""Hugging Face transformers glue: the ``"sinklora"`` attention and mask functions.

Registered with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` when
``sinklora`` is imported. The mask function hands attention the 2-D padding mask
``[B, kv_len]`` (or ``None`` when nothing is padded), never an ``N x N`` mask.

The attention function dispatches, per call:
1. an ``H2OCache`` bound to this layer -> H2O prefill / decode (``sinklora.h2o``);
2. module in training mode, keys are exactly this call's tokens -> SF-Attn
   (``sinklora.sf_attention``, Triton kernels on CUDA, the PyTorch fallback elsewhere);
3. otherwise -> full causal attention (SDPA); after cached keys, queries attend to the keys
   up to their own position (a ``q_len x kv_len`` bool mask when there are several queries).

In cases 2 and 3 without cached keys, a padded or packed batch is split into documents (the
real tokens of a row, cut where ``position_ids`` do not continue by +1, as
``DataCollatorWithFlattening`` produces), and documents of equal length are attended together
as one batch: groups, sinks and causality are per document, pads are never attended.

``"sinklora_reference"`` is the same model with the dense float64 SF-Attn of the spec (builds
``N x N``; for tests and the demo only).
"""
import inspect
import math

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from .._checks import check_float, check_int
from ..sf_attn import sf_attention, sf_attention_reference
from ..sf_attn.params import check_group_size, check_mode, check_num_sink
from .cache import bound_layer

ATTN_NAME = "sinklora"
REFERENCE_ATTN_NAME = "sinklora_reference"
# The SF-Attn settings live on the model config under this key (saved with it in config.json).
CONFIG_KEY = "sinklora"
# The keyword that hands a cache to a model's forward and to generate(): transformers 5.24
# renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40 / 6.0).
CACHE_ARG = ("cache" if "cache" in inspect.signature(LlamaModel.forward).parameters
             else "past_key_values")

_default_settings = None  # set by replace_llama_attn() without a model


def sf_settings(group_size_ratio=0.25, group_size=None, num_sink=4, mode="sf", shift_heads=None):
    """Validated SF-Attn settings as the dict stored on a config under ``CONFIG_KEY``."""
    group_size_ratio = check_float("group_size_ratio", group_size_ratio)
    if not (math.isfinite(group_size_ratio) and 0 < group_size_ratio <= 1):
        raise ValueError(f"group_size_ratio must be in (0, 1], got {group_size_ratio}")
    if group_size is not None:
        group_size = check_group_size(group_size)
    num_sink = check_num_sink(num_sink)
    check_mode(mode)
    if shift_heads is not None:
        shift_heads = check_int("shift_heads", shift_heads)
        if shift_heads < 0:
            raise ValueError(f"shift_heads must be >= 0 or None, got {shift_heads}")
    return {"group_size_ratio": group_size_ratio, "group_size": group_size,
            "num_sink": num_sink, "mode": mode, "shift_heads": shift_heads}


def group_size_for(settings, seq_len):
    """The group size used for a batch whose padded length is ``seq_len``.

    ``settings["group_size"]`` when set, else ``int(seq_len * group_size_ratio)`` rounded down
    to an even number, at least 2. As in LongLoRA, the ratio applies to the length of the
    batch tensor (the padded / packed row), not to each sequence: every sequence and document
    of the batch gets the same ``G``, and its groups start at its own first token.
    """
    if settings["group_size"] is not None:
        return settings["group_size"]
    g = int(seq_len * settings["group_size_ratio"])
    return max(2, g - g % 2)


def _settings(module):
    found = getattr(module.config, CONFIG_KEY, None)
    return found if found is not None else sf_settings()


def replace_llama_attn(model=None, *, group_size_ratio=0.25, group_size=None, num_sink=4,
                       mode="sf", shift_heads=None):
    """Train with SF-Attn, decode with full attention or H2O: switch a model to ``"sinklora"``.

    In a training forward (``model.train()``, no earlier tokens in a cache) every attention
    layer runs ``sinklora.sf_attention`` with these settings; in ``model.eval()`` and in
    ``generate()`` it runs full causal attention (SDPA), or H2O when an ``H2OCache`` is passed.
    Padded batches (right or left, 2-D ``attention_mask``) and packed batches (``position_ids``
    restarting per document, as ``DataCollatorWithFlattening`` produces) get groups and sinks
    per sequence / document; no ``N x N`` mask is built.

    Args:
        model: a transformers model (or a peft model wrapping one). Given, that model alone is
            switched (``model.set_attn_implementation("sinklora")``) and the settings are stored
            on its config under ``config.sinklora`` (so they are saved with it). ``None``: every
            Llama model created afterwards (``LlamaForCausalLM(config)``, ``from_pretrained``)
            without an explicit ``attn_implementation`` gets ``"sinklora"`` and these settings
            (replacing settings saved in a checkpoint's ``config.json``; to keep those, load
            with ``attn_implementation="sinklora"``). transformers resolves an unset
            implementation in
            ``PreTrainedModel.get_correct_attn_implementation`` (``None`` -> ``"sdpa"``); this
            overrides that method on ``LlamaPreTrainedModel`` so that ``None`` resolves to
            ``"sinklora"``. An explicit ``attn_implementation="sdpa"`` still wins.
        group_size_ratio: ``G = int(N * ratio)`` rounded down to even (>= 2), ``N`` the length
            of the batch tensor, as LongLoRA (0.25). Ignored when ``group_size`` is given.
        group_size: a fixed even ``G`` instead of the ratio.
        num_sink: leading tokens every query sees (SinkLoRA: 4). ``mode="sf", num_sink=0`` is
            S2 with segmentation and reassembly; LongLoRA's S2-Attn is ``mode="s2",
            num_sink=0``.
        mode: ``"sf"`` (SinkLoRA) or ``"s2"`` (LongLoRA's roll; needs every sequence length to
            be a multiple of ``G``).
        shift_heads: how many of the last query heads use shifted groups (default ``Hq // 2``).

    Returns:
        ``model`` (``None`` when called without one).

    Tested architectures (tests/hf): Llama, Mistral (``sliding_window`` unset or longer than
    the sequence) and Qwen2; they share Llama's attention call. Sliding-window layers shorter
    than the sequence raise an error.
    """
    global _default_settings
    settings = sf_settings(group_size_ratio, group_size, num_sink, mode, shift_heads)
    if model is None:
        _default_settings = settings
        LlamaPreTrainedModel.get_correct_attn_implementation = _default_to_sinklora
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (or a peft model), "
                        f"got {type(model).__name__}")
    heads = getattr(base.config, "num_attention_heads", None)
    if shift_heads is not None and heads is not None and shift_heads > heads:
        raise ValueError(f"shift_heads must be in [0, {heads}] (the model's query heads), "
                         f"got {shift_heads}")
    base.set_attn_implementation(ATTN_NAME)
    setattr(base.config, CONFIG_KEY, settings)
    return model


def _default_to_sinklora(self, requested_attention, is_init_check=False):
    unset = requested_attention is None  # then replace_llama_attn()'s settings win
    if unset:
        requested_attention = ATTN_NAME
    if unset or (requested_attention == ATTN_NAME
                 and getattr(self.config, CONFIG_KEY, None) is None):
        setattr(self.config, CONFIG_KEY, dict(_default_settings))
    return PreTrainedModel.get_correct_attn_implementation(self, requested_attention, is_init_check)


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
        _check_call(attention_mask, kwargs.get("sliding_window"),
                    kv_len if layer is None else layer.seen)
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
            settings = _settings(module)
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
        return _attend_per_document(attend, query, key, value, attention_mask, position_ids), None
    if q_len > 1 and position_ids is not None and _restarts(position_ids).any():
        raise ValueError("packed sequences (position_ids restarting) are supported only without "
                         "cached keys; run packed batches without a cache")
    return sdpa_attention_forward(module, query, key, value,
                                  _sdpa_mask(attention_mask, query, kv_len),
                                  dropout=dropout, scaling=scaling, **kwargs)


def _check_call(attention_mask, sliding_window, keys):
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"sinklora attention takes the 2-D padding mask [B, kv_len], got an "
                         f"attention_mask of shape {tuple(attention_mask.shape)}; pass a 2-D "
                         "attention_mask (and position_ids for packed documents)")
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


def _restarts(position_ids):
    """``[B, N - 1]`` bool: token ``t + 1`` does not continue token ``t``'s document."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be 2-D [B, N], got shape {tuple(position_ids.shape)}")
    return position_ids.diff(dim=-1) != 1


def _documents(padding_mask, position_ids, batch, seq_len, device):
    """The batch's documents grouped by length, or ``None`` when each row is one document.

    Returns ``[(rows, cols), ...]``, one pair of ``[num_docs, length]`` index tensors per
    distinct document length: ``(rows[d, t], cols[d, t])`` is the ``t``-th token of document
    ``d``. A document is a run of real tokens (``padding_mask`` True) of one row whose
    positions go up by one; pads may sit anywhere (left, right).
    """
    if position_ids is not None:
        position_ids = position_ids.to(device).expand(batch, seq_len)
        packed = bool(_restarts(position_ids).any())
    else:
        packed = False
    if padding_mask is None and not packed:
        return None
    real = (padding_mask.bool() if padding_mask is not None
            else torch.ones(batch, seq_len, dtype=torch.bool, device=device))
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=device).expand(batch, seq_len)
    flat = real.reshape(-1).nonzero().squeeze(1)  # real tokens, in row-major order
    rows, cols = flat // seq_len, flat % seq_len
    pos = position_ids[rows, cols]
    new_doc = torch.ones_like(flat, dtype=torch.bool)
    new_doc[1:] = (rows[1:] != rows[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = new_doc.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([flat.numel()]))
    if starts.numel() == batch and bool((lengths == seq_len).all()):
        return None
    docs = []
    for length in sorted(set(lengths.tolist())):
        tok = starts[lengths == length][:, None] + torch.arange(length, device=device)
        docs.append((rows[tok], cols[tok]))
    return docs


# Every layer of one forward gets the same padding mask and position_ids objects; finding the
# documents reads them on the host (a device sync), so it is done once per forward, not per layer.
# The tensors themselves are kept (so their ids cannot be reused) with their versions (so an
# in-place change is seen). Inference tensors (torch.inference_mode) have no version counter:
# they are read per layer.
_last_split = None


def _documents_once(padding_mask, position_ids, batch, seq_len, device):
    global _last_split
    tensors = (padding_mask, position_ids)
    if any(t is not None and t.is_inference() for t in tensors):
        return _documents(padding_mask, position_ids, batch, seq_len, device)
    versions = tuple(None if t is None else t._version for t in tensors)
    if _last_split is not None:
        seen, seen_versions, seen_shape, docs = _last_split
        if (all(a is b for a, b in zip(seen, tensors)) and seen_versions == versions
                and seen_shape == (batch, seq_len)):
            return docs
    docs = _documents(padding_mask, position_ids, batch, seq_len, device)
    _last_split = (tensors, versions, (batch, seq_len), docs)
    return docs


def _attend_per_document(attend, query, key, value, padding_mask, position_ids):
    """``attend`` (``[b, Hq, L, D]`` inputs -> ``[b, L, Hq, D]``) applied per document.

    Documents of equal length share one call; pad queries get a zero output.
    """
    batch, _, seq_len, _ = query.shape
    docs = _documents_once(padding_mask, position_ids, batch, seq_len, query.device)
    if docs is None:
        return attend(query, key, value)
    outs, all_rows, all_cols = [], [], []
    for rows, cols in docs:
        # Advanced indices around a slice put the [num_docs, L] dims first: [num, L, H, D].
        q, k, v = (t[rows, :, cols].transpose(1, 2) for t in (query, key, value))
        outs.append(attend(q, k, v).flatten(0, 1))
        all_rows.append(rows.flatten())
        all_cols.append(cols.flatten())
    out = query.new_zeros(batch, seq_len, query.shape[1], query.shape[3])
    return out.index_put((torch.cat(all_rows), torch.cat(all_cols)), torch.cat(outs))


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
    """The ``"sinklora_reference"`` attention: SF-Attn by the spec's dense mask, in float64.

    Always SF-Attn (training or not), with the settings and group size rule of ``"sinklora"``.
    Builds ``[Hq, N, N]``: for tests and the demo only. Unpadded, unpacked batches only.
    """
    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or query.shape[2] != key.shape[2]
            or (position_ids is not None and _restarts(position_ids).any())):
        raise ValueError("the reference attention takes unpadded, unpacked batches without "
                         "cached keys")
    settings = _settings(module)
    out = sf_attention_reference(
        query, key, value, group_size=group_size_for(settings, query.shape[2]),
        num_sink=settings["num_sink"], shift_heads=settings["shift_heads"],
        mode=settings["mode"], softmax_scale=scaling)
    return out.to(query.dtype).transpose(1, 2), None


AttentionInterface.register(ATTN_NAME, sinklora_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
AttentionInterface.register(REFERENCE_ATTN_NAME, reference_attention_forward)
AttentionMaskInterface.register(REFERENCE_ATTN_NAME, flash_attention_mask)
