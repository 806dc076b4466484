"""Everything of sinklora that imports transformers or peft: the ``"sinklora"`` attention
(registered with transformers on import; ``import sinklora`` imports this package whenever
transformers and peft are installed), its settings, the ``H2OCache`` and the LoRA recipe."""
from .attention import sinklora_attention_forward
from .cache import H2OCache, H2OLayer
from .compat import CACHE_ARG
from .lora import extend_context, lora_config
from .settings import (ATTN_NAME, CONFIG_KEY, REFERENCE_ATTN_NAME, group_size_for,
                       replace_llama_attn, restore_llama_attn, sf_settings)

__all__ = ["ATTN_NAME", "REFERENCE_ATTN_NAME", "CONFIG_KEY", "CACHE_ARG", "sf_settings",
           "group_size_for", "replace_llama_attn", "restore_llama_attn",
           "sinklora_attention_forward", "H2OCache", "H2OLayer", "extend_context", "lora_config"]
