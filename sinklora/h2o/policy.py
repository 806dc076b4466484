"""H2O's selection rules (``docs/spec/h2o.md``), shared by both backends: the positions of the
real tokens of a prompt, which entries prefill keeps, and which entry a decode step evicts (the
Triton decode kernel applies the same rule on the GPU)."""
import torch


def real_positions(real, seq_len, batch, device):
    """``(positions [B, n], next_position [B])``: index among the sequence's real tokens, -1 for
    pads, and the number of real tokens; ``real`` is ``[B, n]`` bool or ``None``."""
    if real is None:
        positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
        return positions, torch.full((batch,), seq_len, device=device, dtype=torch.long)
    counts = real.long().cumsum(-1)
    return torch.where(real, counts - 1, -1), counts[:, -1].clone()


def eviction_keys(positions, scores, next_position, budget, slots):
    """Who leaves first: ``(primary, secondary)``, smaller first, compared lexicographically.

    Pads (position -1) have primary -1 and go first, by slot; real candidates have their score,
    ties to the smaller position; protected entries (sinks ``pos < num_sink`` and the
    ``recent_budget`` newest positions) have primary ``+inf`` and never leave.
    positions/scores ``[B, Hkv, N]``, next_position ``[B]`` (real tokens seen), slots ``[N]``.
    """
    real = positions >= 0
    newest = (next_position - budget.recent_budget)[:, None, None]
    protected = real & ((positions < budget.num_sink) | (positions >= newest))
    primary = torch.where(real, scores, torch.full_like(scores, -1.0))
    primary = primary.masked_fill(protected, float("inf"))
    secondary = torch.where(real, positions, slots.expand_as(positions))
    return primary, secondary


def prefill_keep(acc, positions, next_position, budget):
    """Slots ``[B, Hkv, K]`` (ascending) kept after prefill, ``K = min(n, budget.total)``: the
    protected entries plus the best candidates, i.e. all but the ``n - total`` that
    :func:`eviction_keys` would evict first."""
    batch, num_kv_heads, seq_len = acc.shape
    slots = torch.arange(seq_len, device=acc.device)
    if seq_len <= budget.total:
        return slots.expand(batch, num_kv_heads, seq_len)
    positions = positions[:, None].expand(batch, num_kv_heads, seq_len)
    primary, secondary = eviction_keys(positions, acc, next_position, budget, slots)
    by_secondary = secondary.argsort(dim=-1, stable=True)
    order = by_secondary.gather(-1, primary.gather(-1, by_secondary).argsort(dim=-1, stable=True))
    return order[..., seq_len - budget.total:].sort(-1).values


def decode_victim(positions, scores, next_position, budget):
    """Slot ``[B, Hkv]`` of the entry a decode step evicts from the ``budget.total + 1`` it
    holds (positions/scores ``[B, Hkv, total + 1]``): the first by :func:`eviction_keys`."""
    slots = torch.arange(positions.shape[-1], device=positions.device)
    primary, secondary = eviction_keys(positions, scores, next_position, budget, slots)
    ties = primary == primary.amin(-1, keepdim=True)
    return torch.where(ties, secondary, torch.iinfo(secondary.dtype).max).argmin(-1)
