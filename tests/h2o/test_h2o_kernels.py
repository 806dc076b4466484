"""The Triton kernels (``sinklora/kernels/h2o_*.py``) against the plain PyTorch path run on the
same inputs in float64, and the PyTorch prefill against dense ``n x n`` float64 attention.

Shapes: batch 2, 4 query heads on 2 kv heads (GQA), prompts and stored entries that are not a
multiple of the kernels' 64-entry blocks, decode split over 1 and 3 chunks."""
import functools

import pytest
import torch

from conftest import KERNEL_DTYPES
import h2o_helpers
from h2o_helpers import TOL, as_float64, pad_mask, rel_err
from sinklora.h2o.budget import H2OBudget
from sinklora.h2o.reference import decode_torch, prefill_torch
from sinklora.h2o.state import H2OState
from sinklora.kernels.h2o_decode import h2o_decode_fwd
from sinklora.kernels.h2o_prefill import h2o_prefill_fwd

BATCH, HQ, HKV, D = 2, 4, 2, 16
SCALE = D ** -0.5
DTYPE_IDS = [str(dt)[6:] for dt in KERNEL_DTYPES]
random_state = functools.partial(h2o_helpers.random_state, BATCH, HKV, D)


PAD_LAYOUTS = {
    # name: [(sequence, first pad, end of the pads), ...]
    "unpadded": [],
    "left-padded": [(1, 0, 7)],
    # A pad query after real keys sees them; its probabilities must still add to no score.
    "right-and-middle-padded": [(0, 50, 70), (1, 20, 27)],
}


def padding(n, layout, device):
    """``[B, n]`` bool (False = pad) for a layout of ``PAD_LAYOUTS``; ``None`` when unpadded."""
    pads = PAD_LAYOUTS[layout]
    return pad_mask(BATCH, n, pads, device) if pads else None


def dense_prefill(q, k, v, real):
    """Prefill by the definition, float64, with the whole ``n x n`` probability matrix."""
    q, k, v = q.double(), k.double(), v.double()
    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
    visible = visible & real[:, None, None, :]
    logits = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)  # a pad query sees nothing: a zero row
    out = (p @ v).transpose(1, 2)
    acc = (p * real[:, None, :, None]).sum(2)  # column sums over real queries
    return out, acc.view(q.shape[0], -1, group, n).sum(2)


@pytest.mark.parametrize("layout", PAD_LAYOUTS)
def test_prefill_torch_matches_dense_attention(layout, device):
    n = 70
    q = torch.randn(BATCH, HQ, n, D, device=device, dtype=torch.float64) * 2
    k, v = (torch.randn(BATCH, HKV, n, D, device=device, dtype=torch.float64) for _ in range(2))
    mask = padding(n, layout, device)
    out, acc = prefill_torch(q, k, v, mask, SCALE)
    real = pad_mask(BATCH, n, PAD_LAYOUTS[layout], device)
    want_out, want_acc = dense_prefill(q, k, v, real)
    assert rel_err(out, want_out) <= TOL[torch.float64]
    assert rel_err(acc, want_acc) <= TOL[torch.float64]
    # Every real query spreads probability 1 over the keys: the scores add up to that.
    assert torch.allclose(acc.sum(-1), real.sum(-1, keepdim=True).double() * (HQ // HKV))
    assert (acc[~real[:, None, :].expand_as(acc)] == 0).all(), "a pad key got a score"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", PAD_LAYOUTS)
def test_prefill_kernels_match_torch(dtype, layout, device):
    n = 70  # two 64-token blocks, the second partial
    q = (torch.randn(BATCH, HQ, n, D, device=device) * 2).to(dtype)
    k, v = (torch.randn(BATCH, HKV, n, D, device=device).to(dtype) for _ in range(2))
    real = padding(n, layout, device)
    out = torch.full((BATCH, n, HQ, D), float("nan"), device=device, dtype=dtype)
    out, acc = h2o_prefill_fwd(q, k, v, real, SCALE, out=out)
    want_out, want_acc = prefill_torch(q.double(), k.double(), v.double(), real, SCALE)
    assert out.dtype == dtype and acc.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(acc).all()
    assert rel_err(out, want_out) <= TOL[dtype]
    assert rel_err(acc, want_acc) <= max(TOL[dtype], TOL[torch.float32])


# Views of one ``torch.empty`` storage whose offsets pass element 2**31 (on CPU the OS maps
# untouched pages lazily: little real memory). name: (n, row stride, query head stride, kv head
# stride, offsets of q, k, v, out inside a row). "rows": transformers' [B, n, H, D] layout with
# rows of 2**20 elements, a head's last rows lie past 2**31; "heads": the third query head and
# the second kv head start past it.
LARGE_OFFSET_LAYOUTS = {
    "rows": (2100, 2**20, D, D, (0, HQ * D, (HQ + HKV) * D, (HQ + 2 * HKV) * D)),
    "heads": (40, 4 * D, 2**30, 2**31, (0, D, 2 * D, 3 * D)),
}


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU interpreter check of the offset arithmetic (lazy storage)")
@pytest.mark.parametrize("layout", LARGE_OFFSET_LAYOUTS)
def test_prefill_offsets_past_2_to_31(layout):
    """Head and row offsets of the prefill kernels are 64-bit, as SF-Attn's; 32-bit offsets
    would wrap around and read or write the wrong elements."""
    n, row, head, kv_head, offsets = LARGE_OFFSET_LAYOUTS[layout]
    storage = torch.empty(HQ * head + n * row, dtype=torch.float16)
    q, k, v = (storage.as_strided((1, heads, n, D), (0, head_stride, row, 1), offset)
               for heads, head_stride, offset in zip((HQ, HKV, HKV), (head, kv_head, kv_head),
                                                     offsets))
    out = storage.as_strided((1, n, HQ, D), (0, row, head, 1), offsets[3]).fill_(float("nan"))
    assert (HQ - 1) * head + (n - 1) * row > 2**31
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, dtype=torch.float16))
    got, acc = h2o_prefill_fwd(q, k, v, None, SCALE, out=out)
    want_out, want_acc = prefill_torch(q.double(), k.double(), v.double(), None, SCALE)
    assert got.data_ptr() == out.data_ptr()
    assert rel_err(got, want_out) <= TOL[torch.float16]
    assert rel_err(acc, want_acc) <= TOL[torch.float32]


DECODE_CASES = {
    # name: (stored entries, budget, pads per sequence, new_real)
    "evict": (150, 150, (0, 0), None),
    "evict-pads": (150, 150, (0, 4), None),
    "append": (150, 160, (0, 0), None),
    "evict-new-pad": (150, 150, (2, 0), (True, False)),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_kernels_match_torch(case, num_splits, dtype, device):
    length, total, pads, new_real = DECODE_CASES[case]
    budget = H2OBudget(heavy_budget=total - 12, recent_budget=8, num_sink=4)
    state = random_state(length, total, [400, 333], pads, dtype, device)
    want = as_float64(state)
    q = (torch.randn(BATCH, HQ, D, device=device) * 2).to(dtype)
    k_new, v_new = (torch.randn(BATCH, HKV, D, device=device).to(dtype) for _ in range(2))
    real = None if new_real is None else torch.tensor(new_real, device=device)

    out = torch.full_like(q, float("nan"))
    h2o_decode_fwd(q, k_new, v_new, state.key_buffer, state.value_buffer, state.position_buffer,
                   state.score_buffer, state.next_position, length, budget.total,
                   budget.recent_budget, budget.num_sink, SCALE, new_real=real, out=out,
                   num_splits=num_splits)
    want_out = decode_torch(q.double(), want, k_new.double(), v_new.double(), real, budget, SCALE)

    assert torch.isfinite(out).all()
    assert rel_err(out, want_out) <= TOL[dtype]
    stored = slice(0, min(length + 1, total))
    assert torch.equal(state.position_buffer[..., stored], want.position_buffer[..., stored])
    assert torch.equal(state.next_position, want.next_position)
    assert torch.equal(state.key_buffer[:, :, stored].double(), want.key_buffer[:, :, stored])
    assert torch.equal(state.value_buffer[:, :, stored].double(), want.value_buffer[:, :, stored])
    assert rel_err(state.score_buffer[..., stored], want.score_buffer[..., stored]) <= TOL[torch.float32]


def test_decode_kernels_take_strided_views(device):
    """transformers hands the step views of ``[B, 1, H, D]`` tensors and the output is a view
    of ``[B, q_len, Hq, D]``; an input whose last dim is strided is copied first; the pad flags
    of a chunk's token are a column of its ``[B, q_len]`` mask. Same result as contiguous
    tensors, bit for bit."""
    budget = H2OBudget(heavy_budget=120, recent_budget=6, num_sink=4)
    state = random_state(130, 130, [300, 200], (1, 0), torch.float32, device)
    twin = H2OState(*(t.clone() for t in state.buffers[:4]), state.length,
                    state.next_position.clone())
    q = torch.randn(BATCH, 1, HQ, D, device=device).transpose(1, 2)[:, :, 0]
    k_new = torch.randn(BATCH, HKV, 2 * D, device=device)[..., ::2]  # last-dim stride 2
    v_new = torch.randn(BATCH, 1, HKV, D, device=device).transpose(1, 2)[:, :, 0]
    out = torch.full((BATCH, 3, HQ, D), float("nan"), device=device)[:, 1]
    # Read as if contiguous, this column would say that both new tokens are pads.
    new_real = torch.tensor([[True, False], [False, True]], device=device)[:, 1]
    assert q.stride(-1) == 1 and k_new.stride(-1) == 2 and out.stride(0) == 3 * HQ * D
    assert new_real.stride(0) == 2

    def step(st, q, k_new, v_new, new_real, out):
        return h2o_decode_fwd(q, k_new, v_new, *st.buffers, 130, budget.total,
                              budget.recent_budget, budget.num_sink, SCALE, new_real=new_real,
                              out=out, num_splits=3)

    got = step(state, q, k_new, v_new, new_real, out)
    want = step(twin, q.contiguous(), k_new.contiguous(), v_new.contiguous(),
                new_real.contiguous(), None)
    assert twin.next_position.tolist() == [300, 201]
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, want)
    for mine, theirs in zip(state.buffers, twin.buffers):
        assert torch.equal(mine, theirs)


def test_decode_kernel_reuses_its_tickets(device):
    """The last program of each (b, g) resets its ticket, so one buffer serves every step."""
    budget = H2OBudget(heavy_budget=120, recent_budget=6, num_sink=4)
    state = random_state(130, 130, [300, 200], (0, 0), torch.float32, device)
    want = as_float64(state)
    tickets = torch.zeros(BATCH * HKV, device=device, dtype=torch.int32)
    for _ in range(3):
        q = torch.randn(BATCH, HQ, D, device=device)
        k_new, v_new = torch.randn(BATCH, HKV, D, device=device), torch.randn(BATCH, HKV, D, device=device)
        h2o_decode_fwd(q, k_new, v_new, state.key_buffer, state.value_buffer,
                       state.position_buffer, state.score_buffer, state.next_position, 130,
                       budget.total, budget.recent_budget, budget.num_sink, SCALE,
                       tickets=tickets, num_splits=3)
        decode_torch(q.double(), want, k_new.double(), v_new.double(), None, budget, SCALE)
        assert not tickets.any()
    assert torch.equal(state.position_buffer, want.position_buffer)


def test_kernels_take_fp32_queries_keys_with_16bit_values(device):
    """Under autocast, RoPE leaves q and k in fp32 while v stays 16-bit: both kernels accept it."""
    n, half = 70, torch.float16
    q, k = torch.randn(BATCH, HQ, n, D, device=device) * 2, torch.randn(BATCH, HKV, n, D, device=device)
    v = torch.randn(BATCH, HKV, n, D, device=device).to(half)
    out, acc = h2o_prefill_fwd(q, k, v, None, SCALE)
    want_out, want_acc = prefill_torch(q.double(), k.double(), v.double(), None, SCALE)
    assert rel_err(out, want_out) <= TOL[half] and rel_err(acc, want_acc) <= TOL[torch.float32]

    budget = H2OBudget(heavy_budget=60, recent_budget=6, num_sink=4)
    state = random_state(70, 70, [90, 80], (0, 0), torch.float32, device)
    state.value_buffer = state.value_buffer.to(half)
    want = as_float64(state)
    q_new, k_new = torch.randn(BATCH, HQ, D, device=device), torch.randn(BATCH, HKV, D, device=device)
    v_new = torch.randn(BATCH, HKV, D, device=device).to(half)
    out = h2o_decode_fwd(q_new, k_new, v_new, state.key_buffer, state.value_buffer,
                         state.position_buffer, state.score_buffer, state.next_position, 70,
                         budget.total, budget.recent_budget, budget.num_sink, SCALE, num_splits=2)
    want_out = decode_torch(q_new.double(), want, k_new.double(), v_new.double(), None, budget, SCALE)
    assert rel_err(out, want_out) <= TOL[half]
    assert torch.equal(state.position_buffer, want.position_buffer)


def test_decode_storage_offsets_past_2_to_31(device):
    """The kernels find a (sequence, kv head)'s slots at ``bg * capacity * D``: with 8 kv heads
    and 19M slots the last head starts past element 2**31, where 32-bit offsets would wrap.
    The storage is ``torch.empty``: on CPU the OS maps untouched pages lazily, and only the
    first ``length`` slots of each head are written (on a GPU it takes 12 GB)."""
    hkv, hq, length = 8, 16, 100
    capacity = 2**31 // ((hkv - 1) * D) + 64
    assert (hkv - 1) * capacity * D > 2**31
    budget = H2OBudget(heavy_budget=length - 20, recent_budget=16, num_sink=4)
    keys, values = (torch.empty(1, hkv, capacity, D, device=device, dtype=torch.float16)
                    for _ in range(2))
    positions = torch.empty(1, hkv, capacity, device=device, dtype=torch.long)
    scores = torch.empty(1, hkv, capacity, device=device)
    small = random_state(length, length, [300, 300], (0, 0), torch.float16, device)
    used = slice(0, length)
    for g in range(hkv):  # the first sequence of a random state, once per kv head
        keys[0, g, used] = small.key_buffer[0, g % HKV]
        values[0, g, used] = small.value_buffer[0, g % HKV]
        positions[0, g, used] = small.position_buffer[0, g % HKV]
        scores[0, g, used] = small.score_buffer[0, g % HKV]
    next_position = torch.tensor([300], device=device)
    want = H2OState(keys[..., used, :].double(), values[..., used, :].double(),
                    positions[..., used].clone(), scores[..., used].double(), length,
                    next_position.clone())
    q = (torch.randn(1, hq, D, device=device) * 2).half()
    k_new, v_new = (torch.randn(1, hkv, D, device=device).half() for _ in range(2))

    out = h2o_decode_fwd(q, k_new, v_new, keys, values, positions, scores, next_position,
                         length, budget.total, budget.recent_budget, budget.num_sink, SCALE,
                         num_splits=2)
    want_out = decode_torch(q.double(), want, k_new.double(), v_new.double(), None, budget, SCALE)
    assert rel_err(out, want_out) <= TOL[torch.float16]
    assert torch.equal(positions[..., used], want.position_buffer)
    assert torch.equal(keys[..., used, :].double(), want.key_buffer)
    assert torch.equal(values[..., used, :].double(), want.value_buffer)
    assert rel_err(scores[..., used], want.score_buffer) <= TOL[torch.float32]
