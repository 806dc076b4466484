"""H2O heavy-hitter KV cache (placeholder until the H2O issue lands)."""


def maybe_attention(module, query, key, value, padding_mask, scaling):
    """H2O attention for ``module`` when an ``H2OCache`` is bound to it, else ``None``."""
    return None
