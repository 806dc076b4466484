"""Bad arguments to the H2O entry points raise ``ValueError`` / ``TypeError`` naming them."""
import numpy as np
import pytest
import torch

from sinklora import H2OCache, h2o_decode, h2o_prefill

BUDGET = dict(heavy_budget=4, recent_budget=2, num_sink=1)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(heavy_budget=-1, recent_budget=2), ValueError, "heavy_budget"),
    (dict(heavy_budget=2, recent_budget=-3), ValueError, "recent_budget"),
    (dict(heavy_budget=2, recent_budget=2, num_sink=-1), ValueError, "num_sink"),
    (dict(heavy_budget=2.0, recent_budget=2), TypeError, "heavy_budget"),
    (dict(heavy_budget=2, recent_budget="4"), TypeError, "recent_budget"),
    (dict(heavy_budget=2, recent_budget=2, num_sink=True), TypeError, "num_sink"),
    (dict(heavy_budget=0, recent_budget=0, num_sink=0), ValueError, "total budget"),
    (dict(heavy_budget=2, recent_budget=2, backend="cuda"), ValueError, "backend"),
])
def test_cache_rejects_bad_budgets(kwargs, error, name):
    with pytest.raises(error, match=name):
        H2OCache(**kwargs)


def test_cache_accepts_numpy_like_integers():
    cache = H2OCache(heavy_budget=np.int64(3), recent_budget=2)
    assert cache.budget.total == 5


def qkv(n=5, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (torch.randn(2, hq, n, d, dtype=dtype), torch.randn(2, hkv, n, d, dtype=dtype),
            torch.randn(2, hkv, n, d, dtype=dtype))


def test_prefill_rejects_bad_tensors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="heavy_budget"):
        h2o_prefill(q, k, v, heavy_budget=-2, recent_budget=1)
    with pytest.raises(ValueError, match="query must be 4-D"):
        h2o_prefill(q[0], k, v, **BUDGET)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value "
                                         r"heads \(3\)"):
        h2o_prefill(q, torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16), **BUDGET)
    with pytest.raises(ValueError, match=r"^key must be \[B, Hkv, n, D\] = \[2, Hkv, 5, 16\]"):
        h2o_prefill(q, k[..., :8], v[..., :8], **BUDGET)
    with pytest.raises(TypeError, match="key must be a floating-point tensor"):
        h2o_prefill(q, k.long(), v, **BUDGET)
    with pytest.raises(TypeError, match="share a dtype"):
        h2o_prefill(q, k.double(), v.double(), **BUDGET)
    with pytest.raises(ValueError, match="padding_mask"):
        h2o_prefill(q, k, v, padding_mask=torch.ones(2, 4), **BUDGET)
    with pytest.raises(ValueError, match="padding_mask must hold only 0 and 1"):
        h2o_prefill(q, k, v, padding_mask=torch.full((2, 5), 0.5), **BUDGET)
    with pytest.raises(TypeError, match="padding_mask must be a torch.Tensor"):
        h2o_prefill(q, k, v, padding_mask=[[1] * 5] * 2, **BUDGET)
    with pytest.raises(ValueError, match="softmax_scale"):
        h2o_prefill(q, k, v, softmax_scale=-1.0, **BUDGET)
    with pytest.raises(ValueError, match="softmax_scale"):
        h2o_prefill(q, k, v, softmax_scale=0.0, **BUDGET)
    with pytest.raises(TypeError, match="softmax_scale"):  # as sf_attention
        h2o_prefill(q, k, v, softmax_scale="0.1", **BUDGET)
    with pytest.raises(ValueError, match="backend"):
        h2o_prefill(q, k, v, backend="fast", **BUDGET)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run in the interpreter only")
def test_interpreter_refuses_bfloat16():
    q, k, v = (t.bfloat16() for t in qkv())
    with pytest.raises(TypeError, match=r"interpreter.*bfloat16 wrongly"):
        h2o_prefill(q, k, v, backend="triton", **BUDGET)


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors, got cpu"):
        h2o_prefill(*qkv(), backend="triton", **BUDGET)


def test_kernels_refuse_float64(device):
    q, k, v = (t.to(device, torch.float64) for t in qkv())
    with pytest.raises(TypeError, match="Triton kernels take"):
        h2o_prefill(q, k, v, backend="triton", **BUDGET)


def test_decode_rejects_a_state_that_does_not_fit():
    q, k, v = qkv()
    _, state = h2o_prefill(q, k, v, backend="torch", **BUDGET)
    step = (q[:, :, 0], k[:, :, 0], v[:, :, 0])
    with pytest.raises(TypeError, match="state must be an H2OState"):
        h2o_decode(step[0], "state", step[1], step[2], **BUDGET)
    with pytest.raises(ValueError, match="state holds"):
        h2o_decode(step[0][:1], state, step[1][:1], step[2][:1], **BUDGET)
    with pytest.raises(ValueError, match="must be the ones the state was prefilled with"):
        h2o_decode(*step[:1], state, *step[1:], **{**BUDGET, "num_sink": 0})
    with pytest.raises(ValueError, match="heavy_budget must be >= 0"):
        h2o_decode(*step[:1], state, *step[1:], heavy_budget=-1)
    with pytest.raises(TypeError, match="recent_budget must be an int"):
        h2o_decode(*step[:1], state, *step[1:], recent_budget=2.0)
    state.budget = None  # as a state assembled by hand: only its size can be checked
    with pytest.raises(TypeError, match="recent_budget must be an int, got NoneType"):
        h2o_decode(*step[:1], state, *step[1:], heavy_budget=4)
    with pytest.raises(ValueError, match="more than the budget"):
        h2o_decode(*step[:1], state, *step[1:], heavy_budget=1, recent_budget=1)
    with pytest.raises(ValueError, match="more than the budget"):  # one entry too many
        h2o_decode(*step[:1], state, *step[1:], heavy_budget=0, recent_budget=state.length - 1)
    with pytest.raises(ValueError, match="padding_mask"):
        h2o_decode(*step[:1], state, *step[1:], padding_mask=torch.ones(3), **BUDGET)
    with pytest.raises(ValueError, match="padding_mask must hold only 0 and 1"):
        h2o_decode(*step[:1], state, *step[1:], padding_mask=torch.tensor([1, 2]), **BUDGET)
    state.length = state.capacity + 1
    with pytest.raises(ValueError, match=r"state.length must be in \[0, "):
        h2o_decode(*step[:1], state, *step[1:], **BUDGET)


@pytest.mark.parametrize("name,bad", [
    ("value_buffer", lambda t: t[:, :, :-1]),
    ("position_buffer", lambda t: t.int()),
    ("score_buffer", lambda t: t.double()),
    ("next_position", lambda t: t[:1]),
])
def test_decode_rejects_state_buffers_that_do_not_fit_one_another(name, bad):
    q, k, v = qkv()
    _, state = h2o_prefill(q, k, v, backend="torch", **BUDGET)
    setattr(state, name, bad(getattr(state, name)))
    with pytest.raises(ValueError, match=f"state.{name} must be"):
        h2o_decode(q[:, :, 0], state, k[:, :, 0], v[:, :, 0], **BUDGET)


def test_triton_decode_refuses_strided_storage(device):
    # The kernels read storage strides from the capacity: a strided buffer would be misread.
    q, k, v = (t.to(device) for t in qkv(n=9))  # past the budget: no buffer grows
    _, state = h2o_prefill(q, k, v, backend="torch", **BUDGET)
    state.score_buffer = state.score_buffer.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="must be contiguous"):
        h2o_decode(q[:, :, 0], state, k[:, :, 0], v[:, :, 0], backend="triton", **BUDGET)


@pytest.mark.parametrize("given", [{}, {"heavy_budget": 4}, BUDGET])
def test_decode_takes_the_budget_from_the_state(given):
    """The budget arguments default to the state's; given, they must equal it (one decode step
    each way keeps the same entries with the same scores)."""
    q, k, v = qkv(n=9)  # past the budget: the steps evict
    _, state = h2o_prefill(q, k, v, backend="torch", **BUDGET)
    _, twin = h2o_prefill(q, k, v, backend="torch", **BUDGET)
    for t in range(3):
        step = (q[:, :, t], k[:, :, t], v[:, :, t])
        out, state = h2o_decode(step[0], state, *step[1:], backend="torch", **given)
        want, twin = h2o_decode(step[0], twin, *step[1:], backend="torch", **BUDGET)
        assert torch.equal(out, want)
    assert state.budget == twin.budget and state.length == twin.length == 7
    for mine, theirs in zip(state.buffers, twin.buffers):
        assert torch.equal(mine, theirs)
