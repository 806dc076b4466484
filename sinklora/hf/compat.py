"""What differs between the transformers versions sinklora supports."""
import inspect

from transformers.models.llama.modeling_llama import LlamaModel

# The keyword that hands a cache to a model's forward and to generate(): transformers 5.24
# renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40 / 6.0).
CACHE_ARG = ("cache" if "cache" in inspect.signature(LlamaModel.forward).parameters
             else "past_key_values")
