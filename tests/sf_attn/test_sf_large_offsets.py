"""Element offsets past 2**31 inside one head and across the batch: the kernels' offsets are
64-bit.

q, k, v are views of one huge, mostly untouched storage (the OS maps untouched pages lazily,
so the test needs little real memory): a row stride of 2**20 elements puts the last rows past
element 2**31, a batch stride just above 2**30 puts the third sequence there; 32-bit offset
arithmetic would wrap around.
"""
import pytest
import torch

from sf_helpers import assert_close
from sinklora import sf_attention
from sinklora.sf_attn import sf_attention_reference

ROW_STRIDE = 2**20
N, D = 2100, 16
# Batch stride: fits in int32, twice it does not.
BATCH, BATCH_STRIDE, BATCH_N = 3, 2**30 + 2**20, 40


def check_views(storage, shape, strides, group_size):
    """q, k, v side by side in each row of ``storage``, random; kernels vs float64 reference."""
    inputs = []
    for offset in (0, D, 2 * D):
        view = storage.as_strided(shape, strides, offset)
        view.copy_(torch.randn(shape, dtype=torch.float16))
        inputs.append(view.detach().requires_grad_())
    kwargs = dict(group_size=group_size, num_sink=4, shift_heads=1)
    out = sf_attention(*inputs, backend="triton", **kwargs)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, d_out)

    dense = [t.detach().contiguous().double().requires_grad_() for t in inputs]
    ref = sf_attention_reference(*dense, **kwargs)
    ref_grads = torch.autograd.grad(ref, dense, d_out.double())
    assert_close(out, ref, torch.float16, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, torch.float16, name)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU interpreter check; on a GPU bench/long_sequence.py runs it at size")
def test_rows_past_2_to_31_elements():
    storage = torch.empty(N * ROW_STRIDE, dtype=torch.float16)
    assert (N - 1) * ROW_STRIDE > 2**31
    check_views(storage, (1, 1, N, D), (N * ROW_STRIDE, N * ROW_STRIDE, ROW_STRIDE, 1), 128)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU interpreter check of the offset arithmetic (lazy storage)")
def test_batches_past_2_to_31_elements():
    """The batch offset is 64-bit too: ``b * stride_b`` wraps in int32 from batch 2 on."""
    storage = torch.empty(BATCH * BATCH_STRIDE, dtype=torch.float16)
    assert 2 * BATCH_STRIDE > 2**31 > BATCH_STRIDE
    check_views(storage, (BATCH, 1, BATCH_N, D), (BATCH_STRIDE, 3 * BATCH_N * D, 3 * D, 1), 8)
