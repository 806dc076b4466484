"""Functional H2O ops: prefill a layer's state from a prompt, then one decode step at a time.

``h2o_prefill`` / ``h2o_decode`` check the arguments of callers outside transformers; the
``H2OCache`` calls the same ``prefill`` / ``decode`` underneath, which run the Triton kernels
(``sinklora/kernels/h2o_*.py``) or the PyTorch path (``reference.py``) between the same
selection (``policy.py``) and bookkeeping (``H2OState``) for both.
"""
import torch

from .._checks import check_attention_inputs, check_mask, check_softmax_scale, resolve_backend
from .budget import H2OBudget, check_budget
from .policy import prefill_keep, real_positions
from .reference import decode_torch, prefill_torch
from .state import H2OState


def _check_state(state, key):
    """``state``'s buffers fit the new ``key`` ``[B, Hkv, D]`` and one another."""
    held = state.key_buffer
    batch, num_kv_heads, head_dim = key.shape
    if (held.shape[0], held.shape[1], held.shape[3]) != (batch, num_kv_heads, head_dim) \
            or held.dtype != key.dtype or held.device != key.device:
        raise ValueError(f"state holds [B, Hkv, *, D] = {tuple(held.shape)} {held.dtype} on "
                         f"{held.device}; key is {tuple(key.shape)} {key.dtype} on {key.device}")
    if not 0 <= state.length <= held.shape[2]:
        raise ValueError(f"state.length must be in [0, {held.shape[2]}] (the slots of "
                         f"state.key_buffer), got {state.length}")
    slots = held.shape[:3]
    # Scores are float32 (float64 for float64 keys: the reference path).
    score_dtype = torch.float64 if held.dtype == torch.float64 else torch.float32
    expected = {"value_buffer": (held.shape, None), "position_buffer": (slots, torch.int64),
                "score_buffer": (slots, score_dtype), "next_position": ((batch,), torch.int64)}
    for name, (shape, dtype) in expected.items():
        t = getattr(state, name)
        if t.shape != shape or (dtype is not None and t.dtype != dtype) or t.device != held.device:
            want = " ".join(str(x) for x in (tuple(shape), dtype, "on", held.device) if x)
            raise ValueError(f"state.{name} must be {want} (to fit state.key_buffer), got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")


def prefill(query, key, value, budget, real, softmax_scale, backend, out=None):
    """Prompt -> (output ``[B, n, Hq, D]``, a new :class:`H2OState` holding the kept entries).

    Arguments already checked: ``real`` ``[B, n]`` bool or ``None``, ``backend`` resolved.
    """
    batch, _, seq_len, head_dim = query.shape
    if backend == "triton":
        from ..kernels.h2o_prefill import h2o_prefill_fwd

        out, acc = h2o_prefill_fwd(query, key, value, real, softmax_scale, out=out)
    else:
        out, acc = prefill_torch(query, key, value, real, softmax_scale, out=out)
    positions, next_position = real_positions(real, seq_len, batch, query.device)
    kept = prefill_keep(acc, positions, next_position, budget)
    kept_kv = kept[..., None].expand(-1, -1, -1, head_dim)
    # Exactly the kept entries, no spare slot; gather's outputs are contiguous, as decode needs.
    return out, H2OState(key.gather(2, kept_kv), value.gather(2, kept_kv),
                         positions[:, None].expand_as(acc).gather(2, kept), acc.gather(2, kept),
                         kept.shape[2], next_position, budget)


def decode(query, state, key, value, budget, new_real, softmax_scale, backend, out=None):
    """One token per sequence: ``query [B, Hq, D]``, ``key/value [B, Hkv, D]``; updates ``state``
    in place (its buffers may be replaced when they grow) and returns the output ``[B, Hq, D]``.

    Arguments already checked: ``new_real`` ``[B]`` bool or ``None``, ``backend`` resolved.
    """
    length = state.begin_step(budget.total)
    if backend == "triton":
        from ..kernels.h2o_decode import h2o_decode_fwd

        out = h2o_decode_fwd(query, key, value, *state.buffers, length, budget.total,
                             budget.recent_budget, budget.num_sink, softmax_scale,
                             new_real=new_real, out=out, tickets=state.decode_tickets)
    else:
        out = decode_torch(query, state, key, value, new_real, budget, softmax_scale, out=out)
    state.end_step(budget.total)
    return out


def _decode_budget(state, heavy_budget, recent_budget, num_sink):
    """The step's :class:`H2OBudget`: the state's, where an argument is ``None``; one given must
    equal it. A state assembled by hand has none: there the arguments are the budget."""
    given = {"heavy_budget": heavy_budget, "recent_budget": recent_budget, "num_sink": num_sink}
    held = state.budget or H2OBudget(None, None, 0)
    budget = check_budget(**{name: getattr(held, name) if value is None else value
                             for name, value in given.items()})
    if state.budget is not None and budget != held:
        raise ValueError(f"heavy_budget, recent_budget, num_sink must be the ones the state was "
                         f"prefilled with ({held.heavy_budget}, {held.recent_budget}, "
                         f"{held.num_sink}), got ({budget.heavy_budget}, {budget.recent_budget}, "
                         f"{budget.num_sink})")
    if state.length > budget.total:
        raise ValueError(f"state holds {state.length} entries, more than the budget {budget.total}")
    return budget


def h2o_prefill(query, key, value, *, heavy_budget, recent_budget, num_sink=0, padding_mask=None,
                softmax_scale=None, backend="auto"):
    """H2O prefill of one attention layer: causal attention over the prompt, then the layer's
    state keeps the protected entries and the ``heavy_budget`` keys with the most attention.

    Args:
        query: ``[B, Hq, n, D]``; key, value: ``[B, Hkv, n, D]`` (RoPE applied, GQA not
            expanded).
        heavy_budget, recent_budget, num_sink: the budget, ``ints >= 0`` with a positive sum.
        padding_mask: ``[B, n]`` (1 = real token, 0 = pad) or ``None``. Positions count real
            tokens only; pads are never attended and are evicted before real tokens.
        softmax_scale: default ``1 / sqrt(D)``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA).

    Returns:
        ``(output [B, Hq, n, D], state)``; ``state`` is an :class:`H2OState` for
        :func:`h2o_decode`.
    """
    budget = check_budget(heavy_budget, recent_budget, num_sink)
    check_attention_inputs(("query", "key", "value"), (query, key, value), "B, H, n, D")
    batch, _, seq_len, head_dim = query.shape
    real = check_mask("padding_mask", padding_mask, (batch, seq_len), query.device)
    backend = resolve_backend(backend, query, "query")
    scale = check_softmax_scale(softmax_scale, head_dim)
    out, state = prefill(query, key, value, budget, real, scale, backend)
    return out.transpose(1, 2), state


def h2o_decode(query, state, key, value, *, heavy_budget=None, recent_budget=None, num_sink=None,
               padding_mask=None, softmax_scale=None, backend="auto"):
    """One H2O decode step of one attention layer (spec "Decode"): the new token's entry joins
    the state, the query attends over every entry, the probabilities are added to the scores
    (summed over the query heads of each kv head), and when the state holds more than the
    budget the lowest-scoring unprotected entry leaves (its slot takes the new entry).

    Args:
        query: ``[B, Hq, D]``, the new token's query; key, value: ``[B, Hkv, D]``, its key and
            value (RoPE applied at the token's position, ``state.next_position``).
        state: the layer's :class:`H2OState` (from :func:`h2o_prefill` or a previous step);
            updated in place.
        heavy_budget, recent_budget, num_sink: default: the state's (``state.budget``); one
            given must equal it. A state assembled by hand has none: there give the first two
            (``num_sink`` defaults to 0).
        padding_mask: ``[B]`` (0 where the new token is a pad) or ``None``.
        softmax_scale: default ``1 / sqrt(D)``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA).

    Returns:
        ``(output [B, Hq, D], state)``.
    """
    check_attention_inputs(("query", "key", "value"), (query, key, value), "B, H, D")
    if not isinstance(state, H2OState):
        raise TypeError(f"state must be an H2OState (from h2o_prefill), got {type(state).__name__}")
    batch, _, head_dim = query.shape
    _check_state(state, key)
    budget = _decode_budget(state, heavy_budget, recent_budget, num_sink)
    new_real = check_mask("padding_mask", padding_mask, (batch,), query.device)
    backend = resolve_backend(backend, query, "query")
    scale = check_softmax_scale(softmax_scale, head_dim)
    out = decode(query, state, key, value, budget, new_real, scale, backend)
    return out, state
