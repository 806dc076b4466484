"""Shared pieces of the H2O tests: tolerances, a literal transcription of the spec (the oracle),
a tiny Llama with sinklora attention, and a recorder of what its attention layers receive."""
import contextlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sinklora.h2o import H2OState
from sinklora.hf.cache import H2OLayer
from sinklora.testing import rel_err  # noqa: F401  re-exported to the tests

# Relative error ``||out - ref|| / ||ref||`` against float64, per input dtype: fp16 rounds the
# inputs and the output (~5e-4 each), bf16 keeps 8 bits.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def tiny_model(attn="sinklora", sharp=True):
    """2 layers, 4 query heads on 2 kv heads, head dim 16, vocab 256, fp32, eval mode.

    ``sharp`` scales the query projections up so that attention is peaked: random tiny models
    otherwise attend almost uniformly and H2O keeps the earliest tokens whatever it computes.
    """
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=2048, pad_token_id=0, attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    if sharp:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8.0)
    return model


@contextlib.contextmanager
def recorded_attention(monkeypatch):
    """Yields a list that collects, per H2O attention call, ``(layer_idx, query, key, value,
    padding_mask)`` as sinklora's attention function receives them."""
    calls = []
    original = H2OLayer.attend

    def recording(layer, query, padding_mask, scaling):
        key, value = layer.pending
        calls.append((layer.layer_idx, query.clone(), key.clone(), value.clone(),
                      None if padding_mask is None else padding_mask.clone()))
        return original(layer, query, padding_mask, scaling)

    monkeypatch.setattr(H2OLayer, "attend", recording)
    yield calls


def pad_mask(batch, n, pads, device):
    """``[batch, n]`` bool, False at the pads: ``pads`` lists ``(sequence, start, stop)``."""
    real = torch.ones(batch, n, dtype=torch.bool, device=device)
    for b, start, stop in pads:
        real[b, start:stop] = False
    return real


class Oracle:
    """The spec (``docs/spec/h2o.md``) for one attention layer, literally: per sequence and kv
    head a Python list of entries ``[pos, acc, key, value]``, float64, one query at a time.
    ``prefill`` / ``decode`` return the attention output of the real queries (pad queries: 0)."""

    def __init__(self, heavy_budget, recent_budget, num_sink, scale):
        self.heavy, self.recent, self.sink = heavy_budget, recent_budget, num_sink
        self.total = heavy_budget + recent_budget + num_sink
        self.scale = scale
        self.entries = None  # entries[b][g] = list of [pos, acc, key, value]
        self.seen = None  # real tokens seen per sequence

    def _attend(self, b, g, queries):
        """Adds the probabilities of ``queries`` (``[R, D]``) over the real entries to acc;
        returns their outputs ``[R, D]``."""
        entries = self.entries[b][g]
        real = [e for e in entries if e[0] >= 0]
        keys = torch.stack([e[2] for e in real])
        values = torch.stack([e[3] for e in real])
        outs = []
        for q in queries:
            p = torch.softmax(keys @ q * self.scale, 0)
            outs.append(p @ values)
            for e, pj in zip(real, p.tolist()):
                e[1] += pj
        return torch.stack(outs)

    def _protected(self, b, e):
        return e[0] >= 0 and (e[0] < self.sink or e[0] >= self.seen[b] - self.recent)

    def prefill(self, q, k, v, real):
        """q ``[B, Hq, n, D]``, k/v ``[B, Hkv, n, D]``, real ``[B, n]`` bool or None."""
        q, k, v = q.double(), k.double(), v.double()
        batch, num_heads, n, _ = q.shape
        num_kv = k.shape[1]
        group = num_heads // num_kv
        real = torch.ones(batch, n, dtype=torch.bool) if real is None else real.cpu()
        out = torch.zeros_like(q)
        self.seen = [0] * batch
        self.entries = [[[] for _ in range(num_kv)] for _ in range(batch)]
        for b in range(batch):
            for i in range(n):
                pos = self.seen[b] if real[b, i] else -1
                self.seen[b] += bool(real[b, i])
                for g in range(num_kv):
                    self.entries[b][g].append([pos, 0.0, k[b, g, i], v[b, g, i]])
                    if real[b, i]:
                        # The list holds tokens 0..i: query i sees exactly the causal prefix.
                        heads = slice(g * group, (g + 1) * group)
                        out[b, heads, i] = self._attend(b, g, q[b, heads, i])
            for g in range(num_kv):
                entries = self.entries[b][g]
                if len(entries) > self.total:
                    keep = [e for e in entries if self._protected(b, e)]
                    rest = sorted((e for e in entries if not self._protected(b, e)),
                                  key=lambda e: (e[0] >= 0, e[1], e[0]), reverse=True)
                    self.entries[b][g] = keep + rest[: self.total - len(keep)]
        return out

    def decode(self, q, k, v, real):
        """q ``[B, Hq, D]``, k/v ``[B, Hkv, D]``, real ``[B]`` bool or None."""
        q, k, v = q.double(), k.double(), v.double()
        batch, num_heads, _ = q.shape
        num_kv = k.shape[1]
        group = num_heads // num_kv
        out = torch.zeros_like(q)
        for b in range(batch):
            is_real = True if real is None else bool(real[b])
            pos = self.seen[b] if is_real else -1
            self.seen[b] += is_real
            for g in range(num_kv):
                entries = self.entries[b][g]
                entries.append([pos, 0.0, k[b, g], v[b, g]])
                if is_real:  # a pad's query, like a pad's key, adds nothing to any score
                    heads = slice(g * group, (g + 1) * group)
                    out[b, heads] = self._attend(b, g, q[b, heads])
                if len(entries) > self.total:
                    candidates = [e for e in entries if not self._protected(b, e)]
                    # Pads first, then the smallest acc, ties to the smallest position.
                    victim = min(candidates, key=lambda e: (e[0] >= 0, e[1], e[0]))
                    entries.remove(victim)
        return out

    def kept(self):
        """``[B][Hkv]`` sorted real positions, and ``[B][Hkv]`` number of pads, stored."""
        positions = [[sorted(e[0] for e in hd if e[0] >= 0) for hd in seq] for seq in self.entries]
        pads = [[sum(e[0] < 0 for e in hd) for hd in seq] for seq in self.entries]
        return positions, pads

    def scores(self):
        """``[B][Hkv]`` dict position -> acc of the stored real entries."""
        return [[{e[0]: e[1] for e in hd if e[0] >= 0} for hd in seq] for seq in self.entries]


def state_view(positions, scores):
    """The same summary as ``Oracle.kept()`` / ``.scores()`` for a cache layer or state."""
    batch, num_kv, _ = positions.shape
    kept = [[sorted(p for p in positions[b, g].tolist() if p >= 0) for g in range(num_kv)]
            for b in range(batch)]
    pads = [[int((positions[b, g] < 0).sum()) for g in range(num_kv)] for b in range(batch)]
    acc = [[{p: s for p, s in zip(positions[b, g].tolist(), scores[b, g].tolist()) if p >= 0}
            for g in range(num_kv)] for b in range(batch)]
    return kept, pads, acc


def assert_matches_oracle(oracle, positions, scores, tol, what):
    """Kept real positions and pad counts equal the oracle's; scores agree to ``tol`` (relative
    to the largest score)."""
    kept, pads, acc = state_view(positions, scores)
    want_kept, want_pads = oracle.kept()
    assert kept == want_kept, f"{what}: kept positions {kept} != oracle {want_kept}"
    assert pads == want_pads, f"{what}: stored pads {pads} != oracle {want_pads}"
    for got_bg, want_bg in zip(sum(acc, []), sum(oracle.scores(), [])):
        top = max(want_bg.values())
        worst = max(abs(got_bg[p] - want_bg[p]) for p in want_bg) / top
        assert worst <= tol, f"{what}: scores off by {worst:.3g} (relative to the largest)"


def random_state(batch, num_kv_heads, head_dim, length, capacity, next_position, num_pads, dtype,
                 device):
    """A state with ``length`` random entries per (b, g): distinct random positions below
    ``next_position[b]``, positive random scores, and ``num_pads[b]`` pad entries."""
    keys = torch.randn(batch, num_kv_heads, capacity, head_dim, device=device).to(dtype)
    values = torch.randn(batch, num_kv_heads, capacity, head_dim, device=device).to(dtype)
    positions = torch.full((batch, num_kv_heads, capacity), -7, device=device, dtype=torch.long)
    for b in range(batch):
        for g in range(num_kv_heads):
            real = length - num_pads[b]
            chosen = torch.randperm(next_position[b], device=device)[:real]
            slots = torch.randperm(length, device=device)
            positions[b, g, slots[:real]] = chosen
            positions[b, g, slots[real:]] = -1
    scores = torch.rand(batch, num_kv_heads, capacity, device=device) * 4
    scores[positions == -1] = 0.0
    return H2OState(keys, values, positions, scores, length,
                    torch.tensor(next_position, device=device))


def as_float64(state):
    """A float64 copy of ``state`` (scores included) for the reference path."""
    return H2OState(state.key_buffer.double(), state.value_buffer.double(),
                    state.position_buffer.clone(), state.score_buffer.double(), state.length,
                    state.next_position.clone())
