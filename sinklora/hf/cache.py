"""``H2OCache``: a transformers 5.x ``Cache`` that keeps each layer at its H2O budget.

How the pieces meet. transformers' attention layer calls ``cache.update(k, v, layer_idx)``
and then the registered attention function, which is not given the cache. ``update`` here
stores nothing: it parks the new key/value on the layer and binds the layer to this thread;
sinklora's attention function (``attention.py``) finds, with :func:`bound_layer`, the layer
whose parked key *is* the key it was handed, and runs prefill or the fused decode step, which
attends, scores, evicts and stores in one go. ``update`` returns the new key/value unchanged,
so the padding mask transformers builds (``get_mask_sizes``) covers exactly those tokens.

If the model's attention is not sinklora's, nothing consumes the parked key/value: the next
``update`` (the next layer, or the next step of a one-layer model) raises instead of letting
the model attend to a cache that never stores anything.
"""
import threading
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .._checks import check_backend, resolve_backend
from ..h2o.budget import check_budget
from ..h2o.ops import decode, prefill

_bound = threading.local()


class H2OLayer(CacheLayerMixin):
    """One attention layer of an :class:`H2OCache`; its entries are ``self.state``."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, budget, backend, layer_idx):
        # No super().__init__(): keys/values are read-only views of the state here.
        self.budget = budget
        self.backend = backend
        self.layer_idx = layer_idx
        self.is_initialized = False
        self.state = None
        self.seen = 0
        self.pending = None

    def __repr__(self):
        stored = self.state.length if self.state is not None else 0
        return f"H2OLayer(layer_idx={self.layer_idx}, stored={stored}, seen={self.seen})"

    @property
    def keys(self):
        """Stored keys ``[B, Hkv, L, D]``, or ``None`` before the first step."""
        return None if self.state is None else self.state.keys

    @property
    def values(self):
        """Stored values ``[B, Hkv, L, D]``, or ``None`` before the first step."""
        return None if self.state is None else self.state.values

    @property
    def positions(self):
        """Original token positions of the stored entries ``[B, Hkv, L]`` (``-1``: a pad)."""
        return None if self.state is None else self.state.positions

    @property
    def scores(self):
        """Accumulated attention of the stored entries ``[B, Hkv, L]`` (float32)."""
        return None if self.state is None else self.state.scores

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Parks the new key/value for sinklora's attention function; returns them unchanged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        self.seen += key_states.shape[-2]
        _bound.layer = weakref.ref(self)
        return key_states, value_states

    def cancel(self):
        """Undoes the parked ``update``: the forward that made it failed before attending."""
        self.seen -= self.pending[0].shape[-2]
        self.pending = None

    def attend(self, query, padding_mask, scaling):
        """Consumes the parked key/value: H2O prefill on the first call, then decode steps
        (one per query token). Returns the output ``[B, q_len, Hq, D]``."""
        if torch.is_grad_enabled() and query.requires_grad:
            self.cancel()
            raise RuntimeError("H2OCache is for inference: run the model under torch.no_grad() "
                               "(model.generate() does)")
        key, value = self.pending
        if self.state is not None:
            held = self.state.key_buffer
            want = (held.shape[0], held.shape[1], held.shape[3], held.dtype)
            got = (key.shape[0], key.shape[1], key.shape[3], key.dtype)
            if got != want:
                self.cancel()
                raise ValueError(f"H2OCache layer {self.layer_idx} holds [B, Hkv, D] = "
                                 f"{list(want[:3])} {want[3]} entries; this forward hands it "
                                 f"{list(got[:3])} {got[3]}: an H2OCache serves one batch of one "
                                 "model, use a new one (or cache.reset())")
        self.pending = None
        batch, num_heads, q_len, head_dim = query.shape
        if scaling is None:
            scaling = head_dim ** -0.5
        backend = resolve_backend(self.backend, query, "query")
        real = None if padding_mask is None else padding_mask.to(torch.bool)
        out = query.new_empty(batch, q_len, num_heads, head_dim)
        if self.state is None:
            _, self.state = prefill(query, key, value, self.budget, real, scaling, backend, out=out)
            return out
        # Prompts continued after prefill go token by token, as the spec says. (``select`` is
        # cheaper than indexing on this per-token, per-layer host path.)
        for t in range(q_len):
            decode(query.select(2, t), self.state, key.select(2, t), value.select(2, t),
                   self.budget, None if real is None else real[:, t], scaling, backend,
                   out=out.select(1, t))
        return out

    def get_mask_sizes(self, query_length):
        # The attention function is handed only this step's tokens; the mask covers them.
        return query_length, self.seen

    def get_seq_length(self):
        """Tokens seen so far (pads included), the next token's index in the input ids."""
        return self.seen

    def get_max_length(self):
        return -1

    def reset(self):
        self.state = None
        self.seen = 0
        self.pending = None
        self.is_initialized = False

    def _map_batch(self, fn):
        if self.state is not None:
            self.state.map_tensors(fn)

    def reorder_cache(self, beam_idx):
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        self._map_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def batch_repeat_interleave(self, repeats):
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove):
        raise ValueError("H2OCache cannot crop: evicted entries are gone, so it cannot roll back "
                         "(assisted / speculative decoding needs a DynamicCache)")

    def offload(self):
        if self.state is not None:
            self.state.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.state is not None and self.state.key_buffer.device != self.device:
            self.state.to(self.device, non_blocking=True)

    @property
    def nbytes(self):
        """Bytes held by this layer's tensors."""
        return 0 if self.state is None else self.state.nbytes


class H2OCache(Cache):
    """Heavy-hitter (H2O) KV cache for transformers 5.x models using sinklora's attention.

    Each layer keeps, per sequence and kv head, at most ``num_sink + heavy_budget +
    recent_budget`` entries: the first ``num_sink`` tokens, the ``recent_budget`` newest ones,
    and the ``heavy_budget`` others with the largest accumulated attention (summed over the
    query heads of the kv head). Storage is allocated for that budget, never for the stream.
    See ``docs/spec/h2o.md``.

    Args:
        heavy_budget: heavy-hitter entries kept (``int >= 0``).
        recent_budget: newest tokens always kept (``int >= 0``).
        num_sink: first tokens always kept (``int >= 0``; SinkLoRA models want 4).
        backend: ``"auto"`` (Triton kernels on CUDA, PyTorch elsewhere), ``"triton"`` or
            ``"torch"``.

    The model must use sinklora's attention (``attn_implementation="sinklora"`` after
    ``import sinklora``); otherwise the first step raises (a one-layer model: the second).
    ``get_seq_length()`` counts tokens seen (so positions keep growing after eviction);
    ``cache.layers[i].positions`` and ``.scores`` (``[B, Hkv, L]``) show what each layer kept.
    """

    def __init__(self, heavy_budget, recent_budget, num_sink=0, *, backend="auto"):
        self.budget = check_budget(heavy_budget, recent_budget, num_sink)
        check_backend(backend)
        self.backend = backend
        self._last_updated = None
        super().__init__(layers=[])

    def __repr__(self):
        b = self.budget
        return (f"H2OCache(heavy_budget={b.heavy_budget}, recent_budget={b.recent_budget}, "
                f"num_sink={b.num_sink}, layers={self.layers})")

    @property
    def heavy_budget(self):
        return self.budget.heavy_budget

    @property
    def recent_budget(self):
        return self.budget.recent_budget

    @property
    def num_sink(self):
        return self.budget.num_sink

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by the attention layers: hands the new key/value to sinklora's attention."""
        last = self._last_updated
        if last is not None and last.pending is not None:
            raise RuntimeError(
                f"H2OCache: layer {last.layer_idx} handed its new keys to the attention function, "
                "but sinklora's attention never consumed them, so the model's attention "
                "implementation is not 'sinklora' and nothing would be cached or evicted. "
                "`import sinklora` and load the model with attn_implementation='sinklora' "
                "(or call model.set_attn_implementation('sinklora')).")
        while len(self.layers) <= layer_idx:
            self.layers.append(H2OLayer(self.budget, self.backend, len(self.layers)))
        self._last_updated = self.layers[layer_idx]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self):
        self._last_updated = None
        super().reset()

    @property
    def nbytes(self):
        """Bytes held by the cache's tensors, all layers."""
        return sum(layer.nbytes for layer in self.layers)


def bound_layer(key):
    """The :class:`H2OLayer` whose ``update`` parked ``key`` (the very tensor sinklora's attention
    function was handed), or ``None`` when no ``H2OCache`` is in use."""
    ref = getattr(_bound, "layer", None)
    layer = None if ref is None else ref()
    if layer is None or layer.pending is None or layer.pending[0] is not key:
        return None
    return layer
