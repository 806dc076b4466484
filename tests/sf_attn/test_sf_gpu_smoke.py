"""The ``gpu_smoke`` set for SF-Attn: the Triton forward and backward in 16-bit against the fp32
PyTorch fallback, at the head dims and tiles the benchmarks compile (D = 64, 128), MHA and GQA,
both modes, sinks on and off, N a multiple of no tile. Compiled on a GPU (bf16 and fp16); under
the interpreter fp16 only, at a smaller N, so that the same code runs everywhere."""
import pytest
import torch

from conftest import INTERPRETED, KERNEL_DTYPES
from sf_helpers import Case, assert_close, make_inputs, poison_kernel_outputs
from sinklora import sf_attention

pytestmark = pytest.mark.gpu_smoke

SMOKE_DTYPES = [dt for dt in KERNEL_DTYPES if dt != torch.float32]
# N: not a multiple of 16 (nor of any tile); G: several groups, the last one partial, so the
# shifted heads' first half-group and the sink block are both used. "s2" needs N % G == 0.
N_SF, N_S2 = (100, 96) if INTERPRETED else (1000, 1024)
# A covering set: each (D, MHA/GQA) once per mode, sinks on and off in each mode.
SMOKE_CASES = [
    Case(1, 4, 1, N_SF, 128, N_SF // 4 - N_SF // 4 % 2, 4, None, "sf"),
    Case(1, 4, 4, N_S2, 128, N_S2 // 4, 0, None, "s2"),
    Case(2, 4, 4, N_SF, 64, N_SF // 4 - N_SF // 4 % 2, 0, None, "sf"),
    Case(1, 8, 2, N_S2, 64, N_S2 // 4, 4, None, "s2"),
]


@pytest.mark.parametrize("case", SMOKE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", SMOKE_DTYPES, ids=str)
def test_kernels_match_the_fp32_fallback(case, dtype, device, monkeypatch):
    poison_kernel_outputs(monkeypatch)
    q, k, v = make_inputs(case, dtype, device, requires_grad=True)
    out = sf_attention(q, k, v, backend="triton", **case.kwargs())
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = sf_attention(q32, k32, v32, backend="torch", **case.kwargs())
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), d_out.float())
    assert out.dtype == dtype
    assert_close(out, ref.detach(), dtype, "out")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, name)
