"""sinklora: Triton kernels for SinkLoRA (SF-Attn training attention, H2O KV-cache decoding)."""
from . import hf  # noqa: F401  registers the "sinklora" attention with transformers
from .sf_attn import sf_attention

__all__ = ["sf_attention"]
__version__ = "0.1.0"
