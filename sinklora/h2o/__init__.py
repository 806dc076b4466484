"""H2O heavy-hitter KV cache (placeholder until the H2O issue lands)."""


def maybe_attention(module, query, key, value, padding_mask, scaling):
    """H2O attention for ``module`` when an ``H2OCache`` is bound to it, else ``None``.

    query ``[B, Hq, q_len, D]``, key/value ``[B, Hkv, kv_len, D]`` as transformers passes them
    (RoPE applied, GQA not expanded; key/value are what the cache's ``update`` returned);
    ``padding_mask`` the 2-D bool ``[B, kv_len]`` mask or ``None``. Returns the attention output
    in transformers' layout ``[B, q_len, Hq, D]``.
    """
    return None
