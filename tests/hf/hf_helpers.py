"""Shared pieces of the glue tests: tiny random decoder models (2 layers, GQA 4:2, hidden 64,
vocab 256) and the relative error."""
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import sinklora
from sinklora.testing import rel_err  # noqa: F401  re-exported to the tests

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def build(arch="llama", attn="sdpa", **settings):
    """A tiny ``arch`` model in fp32; with ``attn="sinklora"`` switched by replace_llama_attn."""
    config_cls, model_cls = ARCHS[arch]
    model = model_cls(config_cls(**TINY, attn_implementation="sdpa"))
    # Random norm weights, so a test also sees whether norms and their gradients line up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if attn == "sinklora":
        sinklora.replace_llama_attn(model, **settings)
    return model




def greedy_generate(model, input_ids, new_tokens, **kwargs):
    """Exactly ``new_tokens`` greedy tokens after ``input_ids`` and the logits of each step
    ``[B, new_tokens, vocab]`` (pad id 0)."""
    out = model.generate(input_ids=input_ids, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits, dim=1)
