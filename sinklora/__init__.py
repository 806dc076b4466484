"""sinklora: Triton kernels for SinkLoRA (SF-Attn training attention, H2O KV-cache decoding).

The kernels and the functional ops need only torch and triton; ``HF_NAMES`` live in
``sinklora.hf``, imported (registering the ``"sinklora"`` attention) when transformers and peft
are installed."""
from .h2o import H2OState, h2o_decode, h2o_prefill
from .sf_attn import sf_attention

HF_NAMES = ("replace_llama_attn", "restore_llama_attn", "lora_config", "extend_context",
            "H2OCache")

try:
    from .hf import H2OCache, extend_context, lora_config, replace_llama_attn, restore_llama_attn
except ModuleNotFoundError as exc:
    if (exc.name or "").split(".")[0] not in ("transformers", "peft"):
        raise
    _hf_missing = exc

    def __getattr__(name):
        if name in HF_NAMES:
            raise ImportError(f"sinklora.{name} needs transformers and peft "
                              f"({_hf_missing}): pip install 'transformers>=5.17' peft")
        raise AttributeError(f"module 'sinklora' has no attribute {name!r}")

__all__ = ["sf_attention", "h2o_prefill", "h2o_decode", "H2OState", *HF_NAMES]
__version__ = "0.1.0"
