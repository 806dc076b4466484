"""The identities of docs/spec/sf_attn.md as property tests, each against an algorithm written
here independently of ``sinklora.kernels.pattern``: LongLoRA's roll-and-reshape S2-Attn, its
flash-attn varlen formulation, full causal attention for ``G >= N``; and the fallback against
the dense reference in float64."""
import pytest
import torch
import torch.nn.functional as F

from sf_helpers import CASES, Case, assert_close, check_against_reference, make_inputs
from sinklora import sf_attention
from sinklora.sf_attn import sf_attention_reference


def _expand_kv(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)


def longlora_s2(q, k, v, group_size, num_sink, shift_heads, scale):
    """LongLoRA's S2-Attn: roll the shifted heads by -G/2, causal attention inside each of the
    N/G contiguous groups, roll back. Sinks (the first ``num_sink`` tokens of the original
    order) are extra keys for every query at or after them that does not already see them
    through its group."""
    b, hq, n, d = q.shape
    k, v = _expand_kv(q, k, v)
    half, groups = group_size // 2, n // group_size
    shifted = torch.arange(hq) >= hq - shift_heads

    def roll(x, direction):
        x = x.clone()
        x[:, shifted] = x[:, shifted].roll(direction * half, dims=2)
        return x

    # pos[h, g, t]: the original position at slot t of group g in head h's rolled order.
    pos = roll(torch.arange(n).expand(1, hq, n), -1)[0].reshape(hq, groups, group_size)
    qg, kg, vg = (roll(x, -1).reshape(b, hq, groups, group_size, d) for x in (q, k, v))
    scores = qg @ kg.transpose(-1, -2) * scale
    causal = torch.ones(group_size, group_size, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    sink = torch.arange(num_sink)
    # A sink at or before slot t in t's own rolled group is already one of t's group keys.
    in_group = ((pos[..., None] == sink).cumsum(dim=-2) > 0)
    sink_visible = (sink <= pos[..., None]) & ~in_group
    sink_scores = torch.einsum("bhgtd,bhsd->bhgts", qg, k[:, :, :num_sink]) * scale
    sink_scores = sink_scores.masked_fill(~sink_visible, float("-inf"))
    probs = torch.softmax(torch.cat([sink_scores, scores], dim=-1), dim=-1)
    out = probs[..., num_sink:] @ vg
    out = out + torch.einsum("bhgts,bhsd->bhgtd", probs[..., :num_sink], v[:, :, :num_sink])
    return roll(out.reshape(b, hq, n, d), 1)


def varlen_sf(q, k, v, group_size, num_sink, shift_heads, scale):
    """LongLoRA's flash-attn training path, as per-segment causal SDPA: unshifted heads on
    segments [0, G), [G, 2G), ...; shifted heads on [0, G/2), [G/2, 3G/2), ... (cut at N).
    Sinks before a segment are prepended as keys every query of the segment sees."""
    b, hq, n, d = q.shape
    k, v = _expand_kv(q, k, v)
    out = torch.empty_like(q)
    for h in range(hq):
        first = group_size // 2 if h >= hq - shift_heads else group_size
        cuts = [0] + list(range(first, n, group_size)) + [n]
        for start, end in zip(cuts[:-1], cuts[1:]):
            sinks = min(num_sink, start)
            keys = torch.cat([k[:, h, :sinks], k[:, h, start:end]], dim=1)
            values = torch.cat([v[:, h, :sinks], v[:, h, start:end]], dim=1)
            mask = torch.ones(end - start, sinks + end - start, dtype=torch.bool)
            mask[:, sinks:] = mask[:, sinks:].tril()
            out[:, h, start:end] = F.scaled_dot_product_attention(
                q[:, h, start:end], keys, values, attn_mask=mask, scale=scale)
    return out


def _inputs64(case):
    return make_inputs(case, torch.float64, "cpu")


def _check_both(case, want):
    """The dense reference and the fallback both equal ``want`` (float64)."""
    q, k, v = _inputs64(case)
    ref = sf_attention_reference(q, k, v, **case.kwargs())
    fallback = sf_attention(q, k, v, backend="torch", **case.kwargs())
    expected = want(q, k, v)
    assert_close(ref, expected, torch.float64, "reference")
    assert_close(fallback, expected, torch.float64, "fallback")


S2_CASES = [
    Case(2, 4, 2, 32, 16, 8, 0, None, "s2"),
    Case(1, 4, 4, 48, 16, 12, 0, 4, "s2"),
    Case(1, 4, 1, 40, 16, 8, 4, 2, "s2"),
    Case(1, 2, 2, 24, 16, 4, 5, 2, "s2"),
    Case(1, 2, 2, 16, 16, 16, 4, 1, "s2"),
    Case(1, 3, 3, 30, 16, 10, 2, 3, "s2", softmax_scale=0.2),
]


@pytest.mark.parametrize("case", S2_CASES, ids=lambda c: c.id)
def test_s2_equals_longlora_roll_and_reshape(case):
    scale = case.softmax_scale or case.d ** -0.5
    shift = case.hq // 2 if case.shift_heads is None else case.shift_heads
    _check_both(case, lambda q, k, v: longlora_s2(q, k, v, case.group_size, case.num_sink,
                                                  shift, scale))


VARLEN_CASES = [
    Case(2, 4, 2, 37, 16, 8, 0, None, "sf"),
    Case(1, 4, 4, 50, 16, 12, 0, 4, "sf"),
    Case(1, 2, 1, 23, 16, 6, 0, 1, "sf"),
    Case(1, 2, 2, 45, 16, 10, 4, 1, "sf"),
    Case(1, 2, 2, 30, 16, 4, 7, 2, "sf", softmax_scale=0.4),
    Case(1, 2, 2, 30, 16, 40, 4, 1, "sf"),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: c.id)
def test_sf_equals_longlora_varlen_segments(case):
    scale = case.softmax_scale or case.d ** -0.5
    shift = case.hq // 2 if case.shift_heads is None else case.shift_heads
    _check_both(case, lambda q, k, v: varlen_sf(q, k, v, case.group_size, case.num_sink,
                                                shift, scale))


# Group size >= N makes every unshifted head one causal group. A shifted head's first group
# is [0, G/2), so it is full causal attention only once G/2 >= N as well.
FULL_CAUSAL_CASES = [
    Case(2, 4, 2, 30, 16, 32, 4, 0, "sf"),
    Case(1, 2, 2, 30, 16, 30, 0, 0, "sf"),
    Case(1, 4, 1, 21, 16, 42, 4, None, "sf"),
    Case(1, 2, 2, 19, 16, 64, 0, 2, "sf"),
    Case(1, 2, 2, 19, 16, 2**64, 4, None, "sf"),  # past int64: clamped, not overflowed
    Case(1, 2, 2, 24, 16, 24, 4, 0, "s2"),
]


@pytest.mark.parametrize("case", FULL_CAUSAL_CASES, ids=lambda c: c.id)
def test_group_covering_the_sequence_is_full_causal_attention(case):
    def causal(q, k, v):
        k, v = _expand_kv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=case.softmax_scale)

    _check_both(case, causal)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fallback_equals_reference_in_float64(case):
    check_against_reference(*make_inputs(case, torch.float64, "cpu", requires_grad=True),
                            "torch", case.kwargs())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_more_sinks_than_tokens_equal_every_token_a_sink(backend, device):
    # num_sink past N changes nothing (and sizes no buffer: 2**40 would not fit in memory).
    case = Case(1, 2, 1, 20, 16, 4, 20, None, "sf")
    q, k, v = make_inputs(case, torch.float32, device, requires_grad=True)
    out = sf_attention(q, k, v, group_size=4, num_sink=2**40, backend=backend)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sf_attention_reference(q64, k64, v64, group_size=4, num_sink=20)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), d_out.double())
    for what, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_close(got, want, torch.float32, what)
