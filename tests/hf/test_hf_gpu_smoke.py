"""The ``gpu_smoke`` set for the transformers glue, on the test device: a tiny Llama (head dim
64) trains a step under bf16 autocast with sinklora attention (the Triton kernels on a GPU, the
fallback elsewhere) against the fp32 model with the float64 reference attention, and
``generate()`` with an ``H2OCache`` holding every token equals the default cache."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sinklora
from conftest import DEVICE, INTERPRETED
from hf_helpers import greedy_generate, rel_err
from sinklora import hf
from sinklora.hf import CACHE_ARG
from sinklora.sf_attn import op

pytestmark = pytest.mark.gpu_smoke

N = 50 if INTERPRETED else 200  # not a multiple of the group size nor of any tile
NEW = 12


def tiny_llama():
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=512, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(DEVICE)
    sinklora.replace_llama_attn(model)
    return model


def _loss_and_grads(model, input_ids, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), out.logits.detach().float(), grads


def test_training_step_under_bf16_autocast(monkeypatch):
    launches = []
    forward = op.sf_attn_forward

    def counting(*args):
        launches.append(args[0].dtype)
        return forward(*args)

    monkeypatch.setattr(op, "sf_attn_forward", counting)
    model = tiny_llama().train()
    input_ids = torch.randint(0, 256, (2, N), device=DEVICE)
    loss, logits, grads = _loss_and_grads(model, input_ids, autocast=True)
    # The Triton kernels where the device has them, once per layer, on bf16 q/k/v.
    assert launches == ([torch.bfloat16] * 2 if DEVICE == "cuda" else [])

    model.set_attn_implementation(hf.REFERENCE_ATTN_NAME)
    ref_loss, ref_logits, ref_grads = _loss_and_grads(model, input_ids, autocast=False)
    model.set_attn_implementation(hf.ATTN_NAME)
    # bf16 matmuls everywhere: on CPU the errors are 2e-5 (loss), 6e-3 (logits), 1.3e-2 (grads).
    assert abs(loss - ref_loss) <= 2e-3 * ref_loss
    assert rel_err(logits, ref_logits) <= 3e-2
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 6e-2, name

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            step_loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        step_loss.backward()
        opt.step()
    assert torch.isfinite(step_loss) and step_loss < loss


def _generate(model, input_ids, **kwargs):
    return greedy_generate(model, input_ids, NEW, **kwargs)


def test_h2o_generate_at_full_budget_equals_the_default_cache():
    model = tiny_llama().eval()
    input_ids = torch.randint(1, 256, (2, N), device=DEVICE)
    mask = torch.ones_like(input_ids)
    mask[1, :7] = 0  # left padding
    tokens, logits = _generate(model, input_ids, attention_mask=mask)
    cache = sinklora.H2OCache(heavy_budget=N + NEW - 16, recent_budget=16)
    h2o_tokens, h2o_logits = _generate(model, input_ids, attention_mask=mask,
                                       **{CACHE_ARG: cache})
    assert torch.equal(h2o_tokens, tokens)
    assert rel_err(h2o_logits, logits) < 1e-4
