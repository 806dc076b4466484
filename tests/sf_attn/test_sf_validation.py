"""Bad arguments raise ValueError / TypeError naming the argument, before any kernel runs, in
every entry point (both backends of ``sf_attention`` and the dense reference)."""
import functools

import numpy as np
import pytest
import torch

from sf_helpers import Case, assert_close, make_inputs
from sinklora import sf_attention
from sinklora.sf_attn import sf_attention_reference

ENTRY_POINTS = {
    "torch": functools.partial(sf_attention, backend="torch"),
    "triton": functools.partial(sf_attention, backend="triton"),
    "reference": sf_attention_reference,
}
GOOD = Case(1, 4, 2, 16, 16, 8, 4, None, "sf")


# name -> (change to the good q, k, v; exception; message pattern).
BAD_TENSORS = {
    "q-3d": (lambda q, k, v: (q[0], k, v), ValueError, r"^q must be 4-D"),
    "k-5d": (lambda q, k, v: (q, k[None], v), ValueError, r"^k must be 4-D"),
    "v-3d": (lambda q, k, v: (q, k, v[0]), ValueError, r"^v must be 4-D"),
    "q-not-tensor": (lambda q, k, v: (q.tolist(), k, v), TypeError, r"^q must be"),
    "q-int": (lambda q, k, v: (q.long(), k, v), TypeError, r"^q must be"),
    "k-v-shapes": (lambda q, k, v: (q, k, v[:, :, :15]), ValueError, r"k and v"),
    "kv-seq-len": (lambda q, k, v: (q, k[:, :, :12], v[:, :, :12]), ValueError,
                   r"^k must be \[B, Hkv, N, D\]"),
    "kv-head-dim": (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError,
                    r"^k must be \[B, Hkv, N, D\]"),
    "kv-batch": (lambda q, k, v: (q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)),
                 ValueError, r"^k must be \[B, Hkv, N, D\]"),
    "gqa-ratio": (lambda q, k, v: (q, k[:, [0, 1, 1]], v[:, [0, 1, 1]]), ValueError,
                  r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    "empty-seq": (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError,
                  r"non-empty"),
    # No query heads: refused as an empty sequence is (it reached torch.cat in the fallback
    # and made an empty output in the kernels).
    "no-q-heads": (lambda q, k, v: (q[:, :0], k[:, :1], v[:, :1]), ValueError, r"non-empty"),
    "dtypes": (lambda q, k, v: (q, k.half(), v), TypeError, r"share a dtype"),
}
# name -> (keyword arguments replacing the good ones; exception; message pattern).
BAD_KWARGS = {
    "group-odd": ({"group_size": 7}, ValueError, r"^group_size"),
    "group-zero": ({"group_size": 0}, ValueError, r"^group_size"),
    "group-negative": ({"group_size": -8}, ValueError, r"^group_size"),
    "group-float": ({"group_size": 8.0}, TypeError, r"^group_size"),
    "group-bool": ({"group_size": True}, TypeError, r"^group_size"),
    "shift-negative": ({"shift_heads": -1}, ValueError, r"^shift_heads"),
    "shift-too-many": ({"shift_heads": 5}, ValueError, r"^shift_heads"),
    "shift-float": ({"shift_heads": 2.0}, TypeError, r"^shift_heads"),
    "sink-negative": ({"num_sink": -1}, ValueError, r"^num_sink"),
    "sink-float": ({"num_sink": 4.0}, TypeError, r"^num_sink"),
    "mode-unknown": ({"mode": "s3"}, ValueError, r"^mode"),
    "mode-case": ({"mode": "SF"}, ValueError, r"^mode"),
    "s2-ragged": ({"mode": "s2", "group_size": 6}, ValueError, r'mode="s2".*group_size'),
    "scale-negative": ({"softmax_scale": -0.1}, ValueError, r"^softmax_scale"),
    "scale-zero": ({"softmax_scale": 0.0}, ValueError, r"^softmax_scale"),
    "scale-nan": ({"softmax_scale": float("nan")}, ValueError, r"^softmax_scale"),
    "scale-str": ({"softmax_scale": "0.1"}, TypeError, r"^softmax_scale"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", BAD_TENSORS)
def test_bad_tensor_is_named(bad, entry):
    change, error, pattern = BAD_TENSORS[bad]
    q, k, v = change(*make_inputs(GOOD, torch.float32, "cpu"))
    with pytest.raises(error, match=pattern):
        ENTRY_POINTS[entry](q, k, v, **GOOD.kwargs())


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", BAD_KWARGS)
def test_bad_keyword_is_named(bad, entry):
    overrides, error, pattern = BAD_KWARGS[bad]
    q, k, v = make_inputs(GOOD, torch.float32, "cpu")
    with pytest.raises(error, match=pattern):
        ENTRY_POINTS[entry](q, k, v, **{**GOOD.kwargs(), **overrides})


def test_numpy_numbers_are_numbers():
    q, k, v = make_inputs(GOOD, torch.float32, "cpu")
    kwargs = {**GOOD.kwargs(), "softmax_scale": 0.25}
    ref = sf_attention(q, k, v, backend="torch", **kwargs)
    np_kwargs = {**kwargs, "group_size": np.int64(kwargs["group_size"]),
                 "num_sink": np.int32(kwargs["num_sink"]), "softmax_scale": np.float32(0.25)}
    assert torch.equal(sf_attention(q, k, v, backend="torch", **np_kwargs), ref)


@pytest.mark.parametrize("backend", ["cuda", "flash", None])
def test_unknown_backend(backend):
    q, k, v = make_inputs(GOOD, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"^backend"):
        sf_attention(q, k, v, backend=backend, **GOOD.kwargs())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run in the interpreter only")
def test_interpreter_refuses_bfloat16():
    q, k, v = make_inputs(GOOD, torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match=r"interpreter.*bfloat16 wrongly"):
        sf_attention(q, k, v, backend="triton", **GOOD.kwargs())


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    q, k, v = make_inputs(GOOD, torch.float32, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors, got cpu"):
        sf_attention(q, k, v, backend="triton", **GOOD.kwargs())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_mismatched_devices(entry):
    q, k, v = make_inputs(GOOD, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"one device"):
        ENTRY_POINTS[entry](q.cuda(), k, v, **GOOD.kwargs())


@pytest.mark.parametrize("head_dim", [8, 24, 48, 96, 512])
def test_triton_rejects_head_dims_it_cannot_take(head_dim):
    q, k, v = make_inputs(Case(1, 2, 2, 16, head_dim, 8, 4, None, "sf"), torch.float32, "cpu")
    with pytest.raises(ValueError, match=rf"head dim.*D={head_dim}"):
        sf_attention(q, k, v, group_size=8, backend="triton")


def test_triton_rejects_float64():
    q, k, v = make_inputs(GOOD, torch.float64, "cpu")
    with pytest.raises(TypeError, match=r"dtype"):
        sf_attention(q, k, v, backend="triton", **GOOD.kwargs())


@pytest.mark.parametrize("head_dim", [24, 48])
def test_fallback_takes_any_head_dim(head_dim):
    case = Case(1, 2, 1, 21, head_dim, 6, 4, None, "sf")
    q, k, v = make_inputs(case, torch.float32, "cpu")
    out = sf_attention(q, k, v, backend="torch", **case.kwargs())
    assert_close(out, sf_attention_reference(q, k, v, **case.kwargs()), torch.float32, "out")
