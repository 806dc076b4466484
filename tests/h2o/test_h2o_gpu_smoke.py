"""The ``gpu_smoke`` set for H2O: the Triton prefill and decode at the benchmarks' head dim
(D = 128, GQA) in 16-bit against the plain PyTorch path in float64, with left padding, with the
decode split over one and several programs (the cross-program merge), and the public ops on
the device against ``backend="torch"``. Compiled on a GPU (bf16 and fp16); fp16 only under the
interpreter."""
import pytest
import torch

from conftest import INTERPRETED, KERNEL_DTYPES
from h2o_helpers import TOL, as_float64, pad_mask, random_state, rel_err
from sinklora import h2o_decode, h2o_prefill
from sinklora.h2o.budget import H2OBudget
from sinklora.h2o.reference import decode_torch, prefill_torch
from sinklora.kernels.h2o_decode import h2o_decode_fwd
from sinklora.kernels.h2o_prefill import h2o_prefill_fwd

pytestmark = pytest.mark.gpu_smoke

BATCH, HQ, HKV, D = 2, 8, 2, 128
SCALE = D ** -0.5
SMOKE_DTYPES = [dt for dt in KERNEL_DTYPES if dt != torch.float32]
# Prompt and stored entries: a multiple of no kernel block (64).
PROMPT = 90 if INTERPRETED else 300
LEFT_PADS = [(1, 0, 13)]


@pytest.mark.parametrize("dtype", SMOKE_DTYPES, ids=str)
def test_prefill_kernels_left_padded(dtype, device):
    q = (torch.randn(BATCH, HQ, PROMPT, D, device=device) * 2).to(dtype)
    k, v = (torch.randn(BATCH, HKV, PROMPT, D, device=device).to(dtype) for _ in range(2))
    real = pad_mask(BATCH, PROMPT, LEFT_PADS, device)
    out = torch.full((BATCH, PROMPT, HQ, D), float("nan"), device=device, dtype=dtype)
    out, acc = h2o_prefill_fwd(q, k, v, real, SCALE, out=out)
    want_out, want_acc = prefill_torch(q.double(), k.double(), v.double(), real, SCALE)
    assert torch.isfinite(out).all() and torch.isfinite(acc).all()
    assert rel_err(out, want_out) <= TOL[dtype]
    assert rel_err(acc, want_acc) <= max(TOL[dtype], TOL[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", SMOKE_DTYPES, ids=str)
def test_decode_kernels_evict_with_pads(dtype, num_splits, device):
    length = PROMPT // 2
    budget = H2OBudget(heavy_budget=length - 12, recent_budget=8, num_sink=4)
    state = random_state(BATCH, HKV, D, length, length, [PROMPT, PROMPT - 40], (0, 5), dtype,
                         device)
    want = as_float64(state)
    q = (torch.randn(BATCH, HQ, D, device=device) * 2).to(dtype)
    k_new, v_new = (torch.randn(BATCH, HKV, D, device=device).to(dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    h2o_decode_fwd(q, k_new, v_new, *state.buffers, length, budget.total, budget.recent_budget,
                   budget.num_sink, SCALE, out=out, num_splits=num_splits)
    want_out = decode_torch(q.double(), want, k_new.double(), v_new.double(), None, budget, SCALE)
    assert torch.isfinite(out).all()
    assert rel_err(out, want_out) <= TOL[dtype]
    assert torch.equal(state.position_buffer, want.position_buffer)
    assert torch.equal(state.next_position, want.next_position)
    assert rel_err(state.score_buffer, want.score_buffer) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", SMOKE_DTYPES, ids=str)
def test_public_ops_on_the_device_match_torch(dtype, device):
    """``h2o_prefill`` then a few ``h2o_decode`` steps with the default backend (the kernels on
    a GPU), a budget holding every token so that both paths keep the same entries."""
    steps = 4
    budget = dict(heavy_budget=PROMPT + steps - 20, recent_budget=16, num_sink=4)
    q = (torch.randn(BATCH, HQ, PROMPT, D, device=device) * 2).to(dtype)
    k, v = (torch.randn(BATCH, HKV, PROMPT, D, device=device).to(dtype) for _ in range(2))
    mask = pad_mask(BATCH, PROMPT, LEFT_PADS, device)
    mine = {}
    for backend in ("auto", "torch"):
        out, state = h2o_prefill(q, k, v, padding_mask=mask, backend=backend, **budget)
        outs = [out]
        gen = torch.Generator(device=device).manual_seed(5)
        for _ in range(steps):
            q1 = (torch.randn(BATCH, HQ, D, device=device, generator=gen) * 2).to(dtype)
            k1, v1 = (torch.randn(BATCH, HKV, D, device=device, generator=gen).to(dtype)
                      for _ in range(2))
            outs.append(h2o_decode(q1, state, k1, v1, backend=backend, **budget)[0])
        mine[backend] = outs, state
    (outs, state), (want_outs, want_state) = mine["auto"], mine["torch"]
    for i, (got, want) in enumerate(zip(outs, want_outs)):
        assert rel_err(got, want) <= TOL[dtype], f"output {i}"
    assert torch.equal(state.next_position, want_state.next_position)
    assert torch.equal(state.position_buffer.sort(-1).values,
                       want_state.position_buffer.sort(-1).values)
