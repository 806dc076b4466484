"""Everything of sinklora that imports transformers or peft: the ``"sinklora"`` attention
(registered with transformers when this package is imported; ``import sinklora`` does so
whenever transformers and peft are installed), ``replace_llama_attn`` and its settings, the
``H2OCache``, and the LoRA recipe."""
from .attention import (ATTN_NAME, CACHE_ARG, CONFIG_KEY, REFERENCE_ATTN_NAME, group_size_for,
                        replace_llama_attn, sf_settings, sinklora_attention_forward)
from .cache import H2OCache, H2OLayer
from .lora import extend_context, lora_config

__all__ = ["ATTN_NAME", "REFERENCE_ATTN_NAME", "CONFIG_KEY", "CACHE_ARG", "sf_settings",
           "group_size_for", "replace_llama_attn", "sinklora_attention_forward", "H2OCache",
           "H2OLayer", "extend_context", "lora_config"]
