"""Element offsets past 2**31 inside one head: the kernels' row offsets are 64-bit.

q, k, v are views of one huge, mostly untouched storage (the OS maps untouched pages lazily,
so the test needs little real memory) with a row stride of 2**20 elements: the last rows sit
past element 2**31, where 32-bit offset arithmetic would wrap around.
"""
import pytest
import torch

from sf_helpers import assert_close
from sinklora import sf_attention
from sinklora.sf_attn import sf_attention_reference

ROW_STRIDE = 2**20
N, D = 2100, 16


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU interpreter check; on a GPU bench/long_sequence.py runs it at size")
def test_rows_past_2_to_31_elements():
    storage = torch.empty(N * ROW_STRIDE, dtype=torch.float16)
    assert (N - 1) * ROW_STRIDE > 2**31
    inputs = []
    for offset in (0, D, 2 * D):  # q, k, v side by side in each row
        view = storage.as_strided((1, 1, N, D), (N * ROW_STRIDE, N * ROW_STRIDE, ROW_STRIDE, 1),
                                  offset)
        view.copy_(torch.randn(1, 1, N, D, dtype=torch.float16))
        inputs.append(view.detach().requires_grad_())
    kwargs = dict(group_size=128, num_sink=4, shift_heads=1)
    out = sf_attention(*inputs, backend="triton", **kwargs)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, d_out)

    dense = [t.detach().contiguous().double().requires_grad_() for t in inputs]
    ref = sf_attention_reference(*dense, **kwargs)
    ref_grads = torch.autograd.grad(ref, dense, d_out.double())
    assert_close(out, ref, torch.float16, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, torch.float16, name)
