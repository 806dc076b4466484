"""Padded (left / right) and packed batches give each sequence / document exactly what it gets
alone: logits at real tokens and the gradients of a per-token loss, in training (SF-Attn, groups
and sinks per document) and in evaluation (full causal attention per document)."""
import gc
import weakref

import pytest
import torch
from hf_helpers import build, rel_err
from transformers import DataCollatorWithFlattening, DynamicCache

import sinklora
from sinklora import hf

TOL, GRAD_TOL = 2e-5, 1e-4
N = 37


def _loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             reduction="sum")


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _alone(model, docs, targets):
    """Logits and loss gradients of each document run as its own unpadded batch of one."""
    logits, loss = [], 0
    for ids, tgt in zip(docs, targets):
        out = model(input_ids=ids[None], use_cache=False).logits[0]
        logits.append(out)
        loss = loss + _loss(out[None], tgt[None])
    loss.backward()
    return [x.detach() for x in logits], _grads(model)


def _check(batch_logits, index, alone_logits, grads, alone_grads):
    for (row, cols), expected in zip(index, alone_logits):
        assert rel_err(batch_logits[row, cols], expected) < TOL
    assert grads.keys() == alone_grads.keys()
    for name, g in grads.items():
        assert rel_err(g, alone_grads[name]) < GRAD_TOL, name


# "mixed": row 1 right-padded, row 2 left-padded; with transformers' default position_ids
# (0..N-1 per row) row 2's first real token (position 25) continues row 1's last (24), and must
# still start a document of its own.
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("side", ["right", "left", "mixed"])
def test_padded_batch_matches_each_sequence(side, training):
    # The batch's G comes from its padded length, so the lone runs use that G explicitly.
    group_size = hf.group_size_for(hf.sf_settings(), N)
    model = build("llama", "sinklora").train(training)
    lengths = [N, 25, 12]
    docs = [torch.randint(0, 256, (n,)) for n in lengths]
    targets = [torch.randint(0, 256, (n,)) for n in lengths]
    input_ids = torch.zeros(len(lengths), N, dtype=torch.long)
    mask = torch.zeros(len(lengths), N, dtype=torch.long)
    index = []
    for row, n in enumerate(lengths):
        right = side == "right" or (side == "mixed" and row % 2 == 1)
        cols = slice(0, n) if right else slice(N - n, N)
        input_ids[row, cols], mask[row, cols] = docs[row], 1
        index.append((row, cols))
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    _loss(torch.cat([logits[r, c] for r, c in index])[None],
          torch.cat(targets)[None]).backward()
    grads = _grads(model)

    sinklora.replace_llama_attn(model, group_size=group_size)
    alone_logits, alone_grads = _alone(model, docs, targets)
    _check(logits.detach(), index, alone_logits, grads, alone_grads)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_packed_batch_matches_each_document(training):
    """Two rows: documents 13, 9, 13, 2 packed by DataCollatorWithFlattening; 20, 10 + 7 pads."""
    model = build("llama", "sinklora", group_size=8, num_sink=3).train(training)
    rows = [[13, 9, 13, 2], [20, 10]]
    docs = [[torch.randint(0, 256, (n,)) for n in row] for row in rows]
    targets = [torch.randint(0, 256, (n,)) for n in sum(rows, [])]
    packed = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs[0]])
    second = torch.cat(docs[1])
    input_ids = torch.zeros(2, N, dtype=torch.long)
    position_ids = torch.zeros(2, N, dtype=torch.long)
    mask = torch.zeros(2, N, dtype=torch.long)
    input_ids[0], position_ids[0], mask[0] = packed["input_ids"][0], packed["position_ids"][0], 1
    input_ids[1, :30], mask[1, :30] = second, 1
    position_ids[1, :30] = torch.cat([torch.arange(20), torch.arange(10)])
    index, start = [], 0
    for row, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            index.append((row, slice(start, start + n)))
            start += n
    # Row 0 alone with no padding mask: transformers passes None, the positions carry the split.
    for attention_mask in (None, mask):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        ids = input_ids if attention_mask is not None else input_ids[:1]
        pos = position_ids if attention_mask is not None else position_ids[:1]
        logits = model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).logits
        used = index if attention_mask is not None else index[:4]
        _loss(torch.cat([logits[r, c] for r, c in used])[None],
              torch.cat(targets[:len(used)])[None]).backward()
        grads = _grads(model)
        flat_docs = sum(docs, [])[:len(used)]
        alone_logits, alone_grads = _alone(model, flat_docs, targets[:len(used)])
        _check(logits.detach(), used, alone_logits, grads, alone_grads)


def test_packed_sequences_with_cached_keys_raise():
    model = build("llama", "sinklora").eval()
    with torch.no_grad():
        past = DynamicCache()
        model(input_ids=torch.randint(0, 256, (1, 8)), **{hf.CACHE_ARG: past})
        with pytest.raises(ValueError, match="packed"):
            model(input_ids=torch.randint(0, 256, (1, 6)), **{hf.CACHE_ARG: past},
                  position_ids=torch.tensor([[8, 9, 10, 0, 1, 2]]))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inference_mode_matches_no_grad(training):
    """Tensors made under torch.inference_mode have no version counter, which the per-forward
    cache of the document split reads: a padded and a packed batch, then generate()."""
    model = build("llama", "sinklora", group_size=8).train(training)
    ids = torch.randint(1, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    packed = dict(input_ids=ids[:1], position_ids=torch.tensor([list(range(7)) + list(range(5))]))
    for kwargs in (dict(input_ids=ids, attention_mask=mask), packed):
        with torch.no_grad():
            expected = model(**kwargs, use_cache=False).logits
        with torch.inference_mode():
            got = model(**kwargs, use_cache=False).logits
        assert torch.equal(got, expected)
    model.eval()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with torch.inference_mode():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_position_ids_changed_in_place_are_seen(training):
    """The document split is cached per forward by tensor identity and version: a buffer of
    position_ids reused (changed in place) for the next forward must be split anew."""
    model = build("llama", "sinklora", group_size=4).train(training)
    ids = torch.randint(1, 256, (1, 12))
    position_ids = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        model(input_ids=ids, position_ids=position_ids, use_cache=False)
        position_ids[0] = torch.tensor(list(range(4)) + list(range(8)))
        got = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        want = model(input_ids=ids, position_ids=position_ids.clone(), use_cache=False).logits
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_documents_found_once_per_forward_and_not_kept(training, monkeypatch):
    """One split per forward for all layers; its tensors go with the forward's (transformers'
    padding mask) or with the caller's position_ids, not kept for the next call."""
    model = build("llama", "sinklora", group_size=4).train(training)
    splits, find = [], hf.documents.find_documents

    def find_documents(*args):
        docs = find(*args)
        splits.append([weakref.ref(t) for pair in docs for t in pair])
        return docs

    monkeypatch.setattr(hf.documents, "find_documents", find_documents)
    ids = torch.randint(1, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    position_ids = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert len(splits) == 1  # two layers
        gc.collect()
        assert all(ref() is None for ref in splits[0])
        model(input_ids=ids[:1], position_ids=position_ids, use_cache=False)
        assert len(splits) == 2
        del position_ids
        gc.collect()
        assert all(ref() is None for ref in splits[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pad_queries_get_a_zero_output(training):
    """Not uninitialized memory: NaN there would reach the gradients through 0 * NaN."""
    model = build("llama", "sinklora", group_size=4).train(training)
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    mask[0, 8:] = False
    fill = torch.utils.deterministic.fill_uninitialized_memory
    # Deterministic mode fills new memory with NaN, so an output never written shows.
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        out, _ = hf.sinklora_attention_forward(attn, q, k, v, mask, scaling=0.25)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert (out[1, :3] == 0).all() and (out[0, 8:] == 0).all()
    assert torch.isfinite(out).all()
