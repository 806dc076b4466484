"""``sinklora.H2OCache`` inside transformers: ``generate()`` (greedy, sampling, beam search,
left-padded batches) and forward calls on a tiny Llama with ``attn_implementation="sinklora"``.

Both backends run where it is cheap: the PyTorch path for long runs, the Triton kernels (the
CPU interpreter here) for a few steps each."""
import pytest
import torch
from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, MistralConfig,
                          MistralForCausalLM)

from h2o_helpers import Oracle, assert_matches_oracle, recorded_attention, rel_err, tiny_model
from sinklora import H2OCache
from sinklora.hf import CACHE_ARG

BACKENDS = ["torch", "triton"]
HEAD_DIM, NUM_KV_HEADS = 16, 2


@pytest.fixture(autouse=True)
def _one_thread():
    # A tiny model's ops are microseconds of work: handing them to a second thread costs more
    # than it saves (3x slower on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class EveryStep(LogitsProcessor):
    """Calls ``fn()`` after every forward of ``generate()``, leaving the logits alone."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, input_ids, scores):
        self.fn()
        return scores


def generate(model, ids, cache, new_tokens, mask=None, every_step=None, **kwargs):
    processors = LogitsProcessorList([EveryStep(every_step)] if every_step else [])
    return model.generate(ids, attention_mask=mask, **{CACHE_ARG: cache},
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          logits_processor=processors, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


def prompts(lengths, device, vocab=256):
    """Left-padded batch of random prompts (ids 1..vocab-1; 0 is the pad) and its mask."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(1, vocab, (n,))
        mask[b, width - n:] = 1
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_covering_the_stream_generates_like_dynamic_cache(backend, device):
    model = tiny_model().to(device)
    ids, mask = prompts([11, 11], device)
    new = 12 if backend == "torch" else 4
    want = generate(model, ids, DynamicCache(), new, mask)
    cache = H2OCache(heavy_budget=16, recent_budget=4, num_sink=4, backend=backend)
    got = generate(model, ids, cache, new, mask)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert rel_err(a, b) <= 1e-5, f"step {step}: logits differ"
    assert cache.get_seq_length() == 11 + new - 1
    assert cache.layers[0].positions.shape == (2, NUM_KV_HEADS, 11 + new - 1)


@pytest.mark.parametrize("mode", ["sample", "beam"])
def test_sampling_and_beam_search_like_dynamic_cache(mode, device):
    model = tiny_model().to(device)
    ids, mask = prompts([9, 9], device)
    kwargs = dict(do_sample=True, top_k=0) if mode == "sample" else dict(num_beams=3, do_sample=False)
    torch.manual_seed(1)
    want = generate(model, ids, DynamicCache(), 8, mask, **kwargs)
    torch.manual_seed(1)
    got = generate(model, ids, H2OCache(heavy_budget=20, recent_budget=4, backend="torch"), 8, mask,
                   **kwargs)
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_budget_keeps_what_the_spec_keeps_step_by_step(backend, monkeypatch, device):
    """Two different prompts (left-padded), GQA: after every step each layer holds exactly the
    budget, with its sinks and recent window, and the entries a literal reading of the spec
    keeps when fed the same queries, keys and values."""
    heavy, recent, sink = 4, 3, 2
    total = heavy + recent + sink
    model = tiny_model().to(device)
    ids, mask = prompts([14, 10], device)
    new = 10 if backend == "torch" else 4
    cache = H2OCache(heavy_budget=heavy, recent_budget=recent, num_sink=sink, backend=backend)
    oracles = [Oracle(heavy, recent, sink, HEAD_DIM ** -0.5) for _ in range(2)]
    checked = []

    def check(calls):
        for layer_idx, q, k, v, padding in calls[len(checked):]:
            oracle = oracles[layer_idx]
            if oracle.entries is None:
                oracle.prefill(q, k, v, padding)
            else:
                oracle.decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], None if padding is None else padding[:, 0])
            checked.append(layer_idx)
        step = len(checked) // 2
        for layer_idx, layer in enumerate(cache.layers):
            what = f"layer {layer_idx} after forward {step}"
            assert layer.positions.shape == (2, NUM_KV_HEADS, min(total, cache.get_seq_length())), what
            assert_matches_oracle(oracles[layer_idx], layer.positions, layer.scores, 1e-5, what)
            for b, real_seen in enumerate(layer.state.next_position.tolist()):
                must = set(range(sink)) | set(range(real_seen - recent, real_seen))
                assert all(must <= set(layer.positions[b, g].tolist()) for g in range(NUM_KV_HEADS)), what

    with recorded_attention(monkeypatch) as calls:
        generate(model, ids, cache, new, mask, every_step=lambda: check(calls))
    assert len(checked) == 2 * new
    assert cache.get_seq_length() == 14 + new - 1
    assert [layer.state.next_position.tolist() for layer in cache.layers] == [[14 + new - 1, 10 + new - 1]] * 2


def test_cache_bytes_stay_flat_over_1000_tokens(device):
    model = tiny_model().to(device)
    ids, _ = prompts([8], device)
    cache = H2OCache(heavy_budget=8, recent_budget=8, num_sink=4)  # the kernels on CUDA
    sizes = []
    generate(model, ids, cache, 1000, every_step=lambda: sizes.append(cache.nbytes))
    # keys + values (fp32, 16 dims) + positions (int64) + scores (fp32) for 20 entries, and the
    # per-sequence position counter (int64), for each of the 2 layers.
    # The Triton path adds its [B * Hkv] int32 merge tickets.
    per_layer = 20 * NUM_KV_HEADS * (2 * HEAD_DIM * 4 + 8 + 4) + 8
    tickets = sum(4 * layer.state.tickets.numel() for layer in cache.layers
                  if layer.state.tickets is not None)
    assert sizes[20:] == [2 * per_layer + tickets] * (1000 - 20)
    assert cache.get_seq_length() == 8 + 1000 - 1
    assert max(cache.layers[0].positions.max().item(), cache.layers[1].positions.max().item()) == 1006


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_generates_like_each_sequence_alone(backend, device):
    model = tiny_model().to(device)
    ids, mask = prompts([13, 6, 9], device)
    new = 12 if backend == "torch" else 4
    budget = dict(heavy_budget=3, recent_budget=2, num_sink=2, backend=backend)
    batch = generate(model, ids, H2OCache(**budget), new, mask)
    for b in range(3):
        alone_ids = ids[b:b + 1, mask[b].bool()]
        alone = generate(model, alone_ids, H2OCache(**budget), new)
        assert torch.equal(batch.sequences[b, ids.shape[1]:], alone.sequences[0, alone_ids.shape[1]:]), \
            f"sequence {b}"


def test_forward_loop_without_generate(device):
    """Manual forward calls: a prompt, then one token at a time and a two-token chunk. With a
    budget above the tokens seen every step's logits equal DynamicCache's."""
    model = tiny_model().to(device)
    ids, _ = prompts([10], device)
    cache = H2OCache(heavy_budget=10, recent_budget=4, backend="torch")
    reference = DynamicCache()
    with torch.no_grad():
        model(ids, **{CACHE_ARG: cache})
        model(ids, **{CACHE_ARG: reference})
        for step in range(3):
            token = torch.randint(1, 256, (1, 1 + (step == 2)), device=device)
            logits = model(token, **{CACHE_ARG: cache}).logits
            assert rel_err(logits, model(token, **{CACHE_ARG: reference}).logits) < 1e-5
    assert cache.get_seq_length() == reference.get_seq_length() == 14
    assert all(layer.positions.shape == (1, NUM_KV_HEADS, 14) for layer in cache.layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chunk_after_the_prompt_is_two_single_steps(backend, device):
    """At a small budget a two-token forward leaves the cache as two one-token forwards do,
    each token with its own pad flag: the chunk's mask marks row 0's second token a pad."""
    model = tiny_model().to(device)
    ids, mask = prompts([10, 7], device)
    chunk = torch.randint(1, 256, (2, 2), device=device)
    mask = torch.cat([mask, torch.tensor([[1, 0], [1, 1]], device=device)], 1)
    caches = [H2OCache(heavy_budget=3, recent_budget=2, num_sink=1, backend=backend)
              for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, attention_mask=mask[:, :10], **{CACHE_ARG: cache})
        together = model(chunk, attention_mask=mask, **{CACHE_ARG: caches[0]}).logits
        apart = torch.cat([model(chunk[:, i:i + 1], attention_mask=mask[:, :11 + i],
                                 **{CACHE_ARG: caches[1]}).logits for i in range(2)], 1)
    assert rel_err(together, apart) < 1e-5
    for one, other in zip(*(cache.layers for cache in caches)):
        assert one.state.next_position.tolist() == [11, 9]  # real tokens seen
        assert one.positions.shape == (2, NUM_KV_HEADS, 6)
        assert torch.equal(one.positions, other.positions)
        assert rel_err(one.scores, other.scores) < 1e-5


def test_reorder_and_select_move_every_tensor_together(device):
    model = tiny_model().to(device)
    ids, _ = prompts([12, 12, 12], device)  # three different sequences
    cache = H2OCache(heavy_budget=3, recent_budget=2, backend="torch")
    with torch.no_grad():
        model(ids, **{CACHE_ARG: cache})
    layer = cache.layers[1]

    def tensors():
        return (layer.keys, layer.values, layer.positions, layer.scores,
                layer.state.next_position)

    before = [t.clone() for t in tensors()]

    def assert_rows(rows):
        for old, new in zip(before, tensors()):
            assert torch.equal(new, old[rows])

    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert_rows([2, 0, 0])
    cache.batch_repeat_interleave(2)  # each sequence repeated in place, not the batch tiled
    assert_rows([2, 2, 0, 0, 0, 0])
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert_rows([2, 0])


def test_other_attention_implementation_raises_at_the_first_step(device):
    model = tiny_model(attn="sdpa").to(device)
    ids, _ = prompts([6], device)
    with pytest.raises(RuntimeError, match="attn_implementation='sinklora'"), torch.no_grad():
        model(ids, **{CACHE_ARG: H2OCache(heavy_budget=2, recent_budget=2)})


def test_crop_is_refused(device):
    model = tiny_model().to(device)
    cache = H2OCache(heavy_budget=2, recent_budget=2, backend="torch")
    with torch.no_grad():
        model(prompts([6], device)[0], **{CACHE_ARG: cache})
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-1)


def test_sliding_window_counts_every_token_seen(device):
    """H2O attends over kept entries from the whole stream, not a window: a layer whose window
    is shorter than the tokens seen raises, and the failed step leaves the cache as it was."""
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=8, attn_implementation="sinklora")
    model = MistralForCausalLM(config).to(device).eval()
    cache = H2OCache(heavy_budget=2, recent_budget=2, backend="torch")
    ids, _ = prompts([8], device)
    with torch.no_grad():
        model(ids, **{CACHE_ARG: cache})
        with pytest.raises(ValueError, match="sliding_window=8 < 9 keys"):
            model(ids[:, :1], **{CACHE_ARG: cache})
    assert cache.get_seq_length() == 8
    assert all(layer.pending is None for layer in cache.layers)


def test_a_forward_with_gradients_leaves_the_cache_as_it_was(device):
    model = tiny_model().to(device)
    ids, _ = prompts([7], device)
    cache = H2OCache(heavy_budget=2, recent_budget=2, backend="torch")
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        model(ids, **{CACHE_ARG: cache})
    assert cache.get_seq_length() == 0
    with torch.no_grad():
        logits = model(ids, **{CACHE_ARG: cache}).logits
        other = H2OCache(heavy_budget=2, recent_budget=2, backend="torch")
        fresh = model(ids, **{CACHE_ARG: other}).logits
    assert torch.equal(logits, fresh)
    assert cache.get_seq_length() == 7


@pytest.mark.parametrize("batch, hidden", [(1, 64), (3, 64), (2, 128)],
                         ids=["batch-1", "batch-3", "head-dim-32"])
def test_a_cache_reused_with_another_batch_or_model_names_the_mismatch(batch, hidden, device):
    """One H2OCache serves one batch of one model: another batch size, or a model with another
    head dim, is refused with the layer and both shapes named, and the cache is left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model().to(device)
    cache = H2OCache(heavy_budget=4, recent_budget=2, backend="torch")
    other = LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, attn_implementation="sinklora")).to(device).eval()
    with torch.no_grad():
        model(prompts([6, 6], device)[0], **{CACHE_ARG: cache})
        with pytest.raises(ValueError, match=rf"layer 0 holds \[B, Hkv, D\] = \[2, 2, 16\] "
                                             rf".*\[{batch}, 2, {hidden // 4}\].*new one"):
            other(torch.randint(1, 256, (batch, 1), device=device), **{CACHE_ARG: cache})
    assert cache.get_seq_length() == 6
    assert all(layer.pending is None for layer in cache.layers)
