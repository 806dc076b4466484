"""The Triton SF-Attn under ``torch.compile``: registered custom ops (schema, fake tensor rule,
autograd) checked by ``torch.library.opcheck``, and a compiled step without graph breaks that
matches eager."""
import pytest
import torch

from conftest import KERNEL_DTYPES
from sf_helpers import Case, assert_close, make_inputs
from sinklora import sf_attention

COMPILE_CASES = [
    Case(1, 4, 2, 21, 16, 8, 4, None, "sf"),
    Case(1, 2, 1, 32, 16, 8, 0, 2, "s2"),
]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.id)
def test_opcheck_forward_and_backward_ops(case, device):
    q, k, v = make_inputs(case, torch.float32, device, requires_grad=True)
    pattern = (case.group_size, case.num_sink,
               case.hq // 2 if case.shift_heads is None else case.shift_heads,
               case.mode == "s2", case.d ** -0.5)
    torch.library.opcheck(torch.ops.sinklora.sf_attn_fwd.default, (q, k, v, *pattern))
    o, lse = torch.ops.sinklora.sf_attn_fwd(q.detach(), k.detach(), v.detach(), *pattern)
    d_out = torch.randn_like(o)
    torch.library.opcheck(torch.ops.sinklora.sf_attn_bwd.default,
                          (d_out, q.detach(), k.detach(), v.detach(), o, lse, *pattern))


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_compiled_step_matches_eager(case, dtype, device):
    def step(q, k, v, d_out):
        out = sf_attention(q, k, v, backend="triton", **case.kwargs())
        return out, (out.float() * d_out).sum()

    # fullgraph=True turns any graph break (at the op or around it) into an error. The
    # backward runs outside the traced function, as in a training loop, through the
    # backward graph AOTAutograd compiled for the op.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        torch.manual_seed(0)
        q, k, v = make_inputs(case, dtype, device, requires_grad=True)
        d_out = torch.randn(q.shape, device=device)
        out, loss = fn(q, k, v, d_out)
        loss.backward()
        results.append((out, q.grad, k.grad, v.grad))
    for name, eager, comp in zip(("out", "dq", "dk", "dv"), *results):
        assert_close(comp, eager.double(), dtype, name)
