"""Functional H2O ops: prefill a layer's state from a prompt, then one decode step at a time.

``h2o_prefill`` / ``h2o_decode`` are the entry points for callers outside transformers; the
``H2OCache`` calls the same ``prefill`` / ``decode`` underneath. Both dispatch to the Triton
kernels (``sinklora/kernels/h2o_*.py``) on CUDA and to the plain PyTorch implementation
(``reference.py``) elsewhere.
"""
import torch

from .._checks import check_softmax_scale, resolve_backend
from .budget import check_budget
from .reference import decode_torch, prefill_keep, prefill_torch, real_positions
from .state import H2OState, new_state


def _check_float(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_mask(name, mask, shape, device):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape {shape} (1 = real token), got {got}")
    # Only a mask of another dtype is read (a device sync): a bool one is 0/1 by construction.
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1 (1 = real token), got other values in "
                         f"a {mask.dtype} tensor")
    return mask.to(device=device, dtype=torch.bool)


def _check_qkv(query, key, value, dims):
    """Shapes of (query, key, value) with the token axis (if any) at dim 2."""
    _check_float("query", query, dims)
    _check_float("key", key, dims)
    _check_float("value", value, dims)
    if key.shape != value.shape:
        raise ValueError(f"key and value must have one shape, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key, value must share a dtype, got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key, value must be on one device, got {query.device}, "
                         f"{key.device}, {value.device}")
    batch, num_heads = query.shape[:2]
    num_kv_heads = key.shape[1]
    if key.shape[0] != batch or key.shape[2:] != query.shape[2:] or num_kv_heads == 0 \
            or num_heads % num_kv_heads:
        raise ValueError(f"query [B, Hq, ...] and key [B, Hkv, ...] must agree in B and in "
                         f"every dim after the heads, with Hq % Hkv == 0; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    if query.numel() == 0:
        raise ValueError(f"query must be non-empty, got shape {tuple(query.shape)}")


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
    state = new_state(key.gather(2, kept_kv), value.gather(2, kept_kv),
                      positions[:, None].expand_as(acc).gather(2, kept), acc.gather(2, kept),
                      next_position)
    state.budget = budget
    return out, state


def decode(query, state, key, value, budget, new_real, softmax_scale, backend, out=None):
    """One token per sequence: ``query [B, Hq, D]``, ``key/value [B, Hkv, D]``; updates ``state``
    in place (its buffers may be replaced when they grow) and returns the output ``[B, Hq, D]``.

    Arguments already checked: ``new_real`` ``[B]`` bool or ``None``, ``backend`` resolved.
    """
    if backend == "torch":
        return decode_torch(query, state, key, value, new_real, budget, softmax_scale, out=out)
    from ..kernels.h2o_decode import h2o_decode_fwd

    length = state.length
    state.reserve(min(length + 1, budget.total), budget.total)
    programs = query.shape[0] * key.shape[1]
    tickets = state.tickets
    if tickets is None or tickets.numel() != programs or tickets.device != query.device:
        state.tickets = torch.zeros(programs, device=query.device, dtype=torch.int32)
    out = h2o_decode_fwd(
        query, key, value, state.key_buffer, state.value_buffer, state.position_buffer,
        state.score_buffer, state.next_position, length, budget.total, budget.recent_budget,
        budget.num_sink, softmax_scale, new_real=new_real, out=out, tickets=state.tickets,
    )
    state.length = min(length + 1, budget.total)
    return out


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
    _check_qkv(query, key, value, 4)
    batch, _, seq_len, head_dim = query.shape
    real = _check_mask("padding_mask", padding_mask, (batch, seq_len), query.device)
    backend = resolve_backend(backend, query, "query")
    scale = check_softmax_scale(softmax_scale, head_dim)
    out, state = prefill(query, key, value, budget, real, scale, backend)
    return out.transpose(1, 2), state


def h2o_decode(query, state, key, value, *, heavy_budget, recent_budget, num_sink=0,
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
        heavy_budget, recent_budget, num_sink: the budget the state was built with.
        padding_mask: ``[B]`` (0 where the new token is a pad) or ``None``.
        softmax_scale: default ``1 / sqrt(D)``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA).

    Returns:
        ``(output [B, Hq, D], state)``.
    """
    budget = check_budget(heavy_budget, recent_budget, num_sink)
    _check_qkv(query, key, value, 3)
    if not isinstance(state, H2OState):
        raise TypeError(f"state must be an H2OState (from h2o_prefill), got {type(state).__name__}")
    batch, _, head_dim = query.shape
    _check_state(state, key)
    if state.budget is not None and state.budget != budget:
        b = state.budget
        raise ValueError(f"heavy_budget, recent_budget, num_sink must be the ones the state was "
                         f"prefilled with ({b.heavy_budget}, {b.recent_budget}, {b.num_sink}), "
                         f"got ({budget.heavy_budget}, {budget.recent_budget}, {budget.num_sink})")
    if state.length > budget.total:
        raise ValueError(f"state holds {state.length} entries, more than the budget {budget.total}")
    new_real = _check_mask("padding_mask", padding_mask, (batch,), query.device)
    backend = resolve_backend(backend, query, "query")
    scale = check_softmax_scale(softmax_scale, head_dim)
    out = decode(query, state, key, value, budget, new_real, scale, backend)
    return out, state
