"""Generation with a replace_llama_attn() model: full attention (DynamicCache) equals plain SDPA,
left-padded batches included, and H2OCache at full budget equals the default generate()."""
import pytest
import torch
from hf_helpers import build, greedy_generate, rel_err

import sinklora
from sinklora.hf import CACHE_ARG

NEW = 12


def _generate(model, input_ids, **kwargs):
    return greedy_generate(model, input_ids, NEW, **kwargs)


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_generate_equals_sdpa_left_padded(cache):
    """A StaticCache hands attention all its slots; the padding mask covers the filled ones."""
    model = build("llama", "sinklora", group_size=4).eval()
    input_ids = torch.randint(1, 256, (2, 20))
    mask = torch.ones_like(input_ids)
    mask[1, :7] = 0
    input_ids[1, :7] = 0
    tokens, scores = _generate(model, input_ids, attention_mask=mask, cache_implementation=cache)
    model.set_attn_implementation("sdpa")
    sdpa_tokens, sdpa_scores = _generate(model, input_ids, attention_mask=mask,
                                         cache_implementation=cache)
    assert torch.equal(tokens, sdpa_tokens)
    assert rel_err(scores, sdpa_scores) < 1e-5
    # and the padded sequence generates what it generates alone
    alone, alone_scores = _generate(model, input_ids[1:, 7:], cache_implementation=cache)
    assert torch.equal(tokens[1:], alone)
    assert rel_err(scores[1:], alone_scores) < 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_several_tokens_after_cached_keys_equal_sdpa(padded):
    """A multi-token forward on a filled DynamicCache (a second turn, assisted decoding): each
    new query sees the keys up to its own position, as with SDPA."""
    from transformers import DynamicCache

    model = build("llama", "sinklora").eval()
    prompt, more = torch.randint(1, 256, (2, 10)), torch.randint(1, 256, (2, 5))
    mask = torch.ones(2, 15, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
    logits = {}
    for attn in ("sinklora", "sdpa"):
        model.set_attn_implementation(attn)
        cache = DynamicCache()
        with torch.no_grad():
            model(prompt, attention_mask=mask[:, :10], **{CACHE_ARG: cache})
            logits[attn] = model(more, attention_mask=mask, **{CACHE_ARG: cache}).logits
    assert rel_err(logits["sinklora"], logits["sdpa"]) < 1e-5


def test_h2o_full_budget_equals_default_generate():
    model = build("llama", "sinklora").eval()
    input_ids = torch.randint(0, 256, (2, 24))
    tokens, scores = _generate(model, input_ids)
    total = input_ids.shape[1] + NEW
    cache = sinklora.H2OCache(heavy_budget=total - 8, recent_budget=8)
    h2o_tokens, h2o_scores = _generate(model, input_ids, **{CACHE_ARG: cache})
    assert torch.equal(h2o_tokens, tokens)
    assert rel_err(h2o_scores, scores) < 1e-5
