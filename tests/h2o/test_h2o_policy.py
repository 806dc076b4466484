"""The eviction policy of both backends, through the functional ops ``h2o_prefill`` /
``h2o_decode``: kept entries, scores and outputs step by step against a literal transcription
of the spec (``Oracle``), and the rules one at a time on hand-made states (ties, pads,
protected entries, the new entry leaving).
"""
import pytest
import torch

from h2o_helpers import TOL, Oracle, assert_matches_oracle, pad_mask, rel_err
from sinklora.h2o import H2OState, h2o_decode, h2o_prefill

BATCH, HQ, HKV, D = 2, 4, 2, 16
BACKENDS = ["torch", "triton"]
# The torch path runs in float64 (the reference itself); the kernels in float32.
DTYPE = {"torch": torch.float64, "triton": torch.float32}
SCORE_TOL = {"torch": 1e-12, "triton": 1e-5}


def random_qkv(n, dtype, device):
    """Queries scaled up so attention is peaked and heavy hitters differ between heads."""
    q = (torch.randn(BATCH, HQ, n, D, device=device) * 3).to(dtype)
    k = torch.randn(BATCH, HKV, n, D, device=device).to(dtype)
    v = torch.randn(BATCH, HKV, n, D, device=device).to(dtype)
    return q, k, v


def assert_invariants(state, budget_total, seen, num_sink, recent_budget, what):
    """Spec invariants: stored == min(budget, tokens seen); sinks and newest always stored."""
    assert state.length == min(budget_total, seen), f"{what}: {state.length} entries stored"
    for b in range(BATCH):
        real_seen = int(state.next_position[b])
        must = set(range(min(num_sink, real_seen))) | set(range(max(real_seen - recent_budget, 0), real_seen))
        for g in range(HKV):
            kept = set(state.positions[b, g].tolist())
            assert must <= kept, f"{what}: sequence {b} head {g} lost {sorted(must - kept)}"


POLICY_CASES = {
    # name: (heavy, recent, sink, prompt length, pads [(sequence, start, stop)],
    #        decode steps (torch, triton))
    "sinklora-padded": (4, 3, 2, 20, [(1, 0, 6)], (14, 5)),
    "pure-h2o": (5, 0, 0, 12, [], (10, 4)),
    "grows-then-evicts": (6, 4, 1, 7, [(1, 0, 3)], (10, 7)),
    # Pad queries that see real keys (not generate()'s layout, but the op takes any mask).
    "right-and-middle-pads": (4, 3, 2, 24, [(0, 8, 12), (1, 15, 24)], (6, 3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_kept_entries_follow_the_spec_step_by_step(case, backend, device):
    heavy, recent, sink, n, pads, steps = POLICY_CASES[case]
    budget = dict(heavy_budget=heavy, recent_budget=recent, num_sink=sink)
    total = heavy + recent + sink
    dtype = DTYPE[backend]
    scale = D ** -0.5
    q, k, v = random_qkv(n, dtype, device)
    real = pad_mask(BATCH, n, pads, device)
    oracle = Oracle(heavy, recent, sink, scale)

    out, state = h2o_prefill(q, k, v, padding_mask=real, backend=backend, **budget)
    want = oracle.prefill(q, k, v, real)
    assert out.shape == q.shape
    err = rel_err(out.transpose(1, 2)[real], want.transpose(1, 2)[real])
    assert err <= TOL[dtype], f"prefill output off by {err:.3g}"
    assert_matches_oracle(oracle, state.positions, state.scores, SCORE_TOL[backend], "prefill")
    assert_invariants(state, total, n, sink, recent, "prefill")
    for step in range(steps[backend == "triton"]):
        qn, kn, vn = (t[:, :, 0] for t in random_qkv(1, dtype, device))
        out, state = h2o_decode(qn, state, kn, vn, backend=backend, **budget)
        want = oracle.decode(qn, kn, vn, None)
        assert out.shape == qn.shape
        what = f"decode step {step}"
        err = rel_err(out, want)  # over the entries kept after earlier evictions
        assert err <= TOL[dtype], f"{what}: output off by {err:.3g}"
        assert_matches_oracle(oracle, state.positions, state.scores, SCORE_TOL[backend], what)
        assert_invariants(state, total, n + step + 1, sink, recent, what)
    assert state.capacity == total, "storage is allocated for the budget, not for the stream"


def hand_state(positions, scores, next_position, device, same_keys=False):
    """One sequence, one kv head (two query heads) with the given entries; random keys, or all
    keys equal so that every real entry receives the same probability."""
    length = len(positions)
    keys = torch.randn(1, 1, length, D, device=device, dtype=torch.float64)
    if same_keys:
        keys = keys[:, :, :1].expand_as(keys).clone()
    values = torch.randn(1, 1, length, D, device=device, dtype=torch.float64)
    return H2OState(keys, values, torch.tensor([[positions]], device=device),
                    torch.tensor([[scores]], device=device, dtype=torch.float64), length,
                    torch.tensor([next_position], device=device))


def decode_one(state, budget, backend, device, new_key=None, new_real=None, query=None):
    """A decode step of a one-sequence state (random query unless given); returns the new
    token's key."""
    if backend == "triton":
        state = H2OState(*(t.float() if t.is_floating_point() else t for t in state.buffers[:4]),
                         state.length, state.next_position)
    dtype = state.key_buffer.dtype
    q = torch.randn(1, 2, D, device=device, dtype=dtype) if query is None else query.to(dtype)
    k = torch.randn(1, 1, D, device=device, dtype=dtype) if new_key is None else new_key.to(dtype)
    v = torch.randn(1, 1, D, device=device, dtype=dtype)
    mask = None if new_real is None else torch.tensor([new_real], device=device)
    _, state = h2o_decode(q, state, k, v, padding_mask=mask, backend=backend, **budget)
    return state, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_evict_the_smallest_position(backend, device):
    # Equal keys and equal scores: every candidate ties; slot order differs from position order.
    positions = [0, 9, 4, 7, 2, 8]
    state = hand_state(positions, [1.0] * 6, 10, device, same_keys=True)
    budget = dict(heavy_budget=4, recent_budget=1, num_sink=1)  # total 6: full
    state, _ = decode_one(state, budget, backend, device, new_key=state.key_buffer[:, :, 0])
    # Protected: sink 0, newest 10. Candidates 9, 4, 7, 2, 8 tie: 2 (slot 4) leaves.
    assert state.positions[0, 0].tolist() == [0, 9, 4, 7, 10, 8]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pad_leaves_before_a_real_entry_scoring_exactly_zero(backend, device):
    # Slots 0-5 hold positions 0, 1, 2, pad, 3, 4; the query gives position 2 probability 0
    # (underflow), so it scores 0 like the pad: being real, not a positive score, must count.
    positions = [0, 1, 2, -1, 3, 4]
    state = hand_state(positions, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0], 5, device)
    axis = torch.zeros(D, dtype=torch.float64, device=device)
    axis[0] = 1.0
    state.key_buffer[0, 0, 2] = -100.0 * axis
    budget = dict(heavy_budget=4, recent_budget=1, num_sink=1)  # total 6: full
    state, _ = decode_one(state, budget, backend, device, query=(100.0 * axis).expand(1, 2, D))
    assert state.scores[0, 0, 2].item() == 0.0, "the setup needs a score of exactly 0"
    assert state.positions[0, 0].tolist() == [0, 1, 2, 5, 3, 4]  # the new token took the pad's


@pytest.mark.parametrize("backend", BACKENDS)
def test_pads_leave_before_any_real_token(backend, device):
    # Pads scoring far above the real entries (whose scores stay below 2, two query heads)
    # still leave first, the first pad's slot first: smallest score alone would evict a real one.
    positions = [0, -1, 3, -1, 1, 2]
    state = hand_state(positions, [0.0, 9.0, 0.0, 9.0, 0.0, 0.0], 4, device)
    budget = dict(heavy_budget=5, recent_budget=1, num_sink=0)
    state, _ = decode_one(state, budget, backend, device)
    assert state.positions[0, 0].tolist() == [0, 4, 3, -1, 1, 2]
    assert state.scores[0, 0, 0] > 0 and state.scores[0, 0, 3] == 9.0, "pads are never attended"


@pytest.mark.parametrize("backend", BACKENDS)
def test_protected_entries_stay_whatever_their_score(backend, device):
    # Sinks (0, 1) and the recent window (7, 8 and the new 9) have tiny scores; 5 and 6 big.
    positions = [5, 0, 7, 1, 6, 8]
    state = hand_state(positions, [50.0, 0.0, 0.0, 0.0, 40.0, 0.0], 9, device)
    budget = dict(heavy_budget=1, recent_budget=3, num_sink=2)
    state, _ = decode_one(state, budget, backend, device)
    assert state.positions[0, 0].tolist() == [5, 0, 7, 1, 9, 8]


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_entry_leaves_when_it_is_the_lowest(backend, device):
    # No recent window: the new token is a candidate with score <= 2 (two query heads) while
    # every stored entry has more, so it is the victim and the stored entries stay.
    positions = [3, 1, 0, 2]
    state = hand_state(positions, [10.0, 11.0, 12.0, 13.0], 4, device)
    budget = dict(heavy_budget=4, recent_budget=0, num_sink=0)
    state, _ = decode_one(state, budget, backend, device)
    assert state.positions[0, 0].tolist() == positions
    assert state.next_position.tolist() == [5], "positions keep counting after eviction"
    # The two heads spread 2.0 over the five entries; what the new one took left with it.
    assert 46.0 < state.scores[0, 0].sum().item() < 48.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_pad_is_not_attended_nor_scored(backend, device):
    positions = [0, 1, 2]
    state = hand_state(positions, [1.0, 2.0, 3.0], 3, device)
    budget = dict(heavy_budget=3, recent_budget=1, num_sink=0)  # room for one more
    state, _ = decode_one(state, budget, backend, device, new_real=False)
    assert state.positions[0, 0].tolist() == [0, 1, 2, -1]
    assert state.next_position.tolist() == [3], "a pad is not a token of the sequence"
    assert state.scores[0, 0].tolist() == [1.0, 2.0, 3.0, 0.0], "a pad's query scores nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_bookkeeping_advances_once_per_step(backend, device):
    """Each step stores one entry more until the budget, the storage growing geometrically but
    never past it; ``next_position`` counts the real tokens (a pad step adds none), once per
    step on either backend; the Triton path makes its tickets once and leaves them at zero."""
    budget = dict(heavy_budget=3, recent_budget=3, num_sink=2)
    q, k, v = random_qkv(3, DTYPE[backend], device)
    real = pad_mask(BATCH, 3, [(1, 0, 1)], device)
    _, state = h2o_prefill(q, k, v, padding_mask=real, backend=backend, **budget)
    seen, lengths, capacities, tickets = [3, 2], [], [], []
    for step in range(7):
        new_real = torch.tensor([True, step != 2], device=device)
        qn, kn, vn = (t[:, :, 0] for t in random_qkv(1, DTYPE[backend], device))
        h2o_decode(qn, state, kn, vn, padding_mask=new_real, backend=backend)
        seen = [s + int(r) for s, r in zip(seen, new_real.tolist())]
        assert state.next_position.tolist() == seen
        lengths.append(state.length)
        capacities.append(state.capacity)
        tickets.append(state.tickets)
    assert lengths == [4, 5, 6, 7, 8, 8, 8]
    assert capacities == [6, 6, 6, 8, 8, 8, 8]
    if backend == "torch":
        assert tickets == [None] * 7
    else:
        assert all(t is tickets[0] for t in tickets) and not tickets[0].any()
