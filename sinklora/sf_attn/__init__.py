"""SF-Attn: the pattern, the dense reference, the PyTorch fallback and the public op."""
from .api import sf_attention
from .reference import dense_mask, sf_attention_reference

__all__ = ["sf_attention", "sf_attention_reference", "dense_mask"]
