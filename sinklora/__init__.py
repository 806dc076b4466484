"""sinklora: Triton kernels for SinkLoRA (SF-Attn training attention, H2O KV-cache decoding)."""
from . import hf  # noqa: F401  registers the "sinklora" attention with transformers
from .h2o import H2OCache, H2OState, h2o_decode, h2o_prefill
from .hf import replace_llama_attn
from .lora import extend_context, lora_config
from .sf_attn import sf_attention

__all__ = ["sf_attention", "replace_llama_attn", "lora_config", "extend_context", "H2OCache",
           "H2OState", "h2o_prefill", "h2o_decode"]
__version__ = "0.1.0"
