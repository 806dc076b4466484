"""Shared pieces of the SF-Attn tests: the covering set of shapes, inputs, tolerances and the
float64 reference with its gradients."""
from dataclasses import dataclass

import torch

from sinklora import sf_attention
from sinklora.sf_attn import sf_attention_reference
from sinklora.sf_attn.params import check_args
from sinklora.testing import rel_err  # noqa: F401  re-exported to the tests

# Relative error ``||out - ref|| / ||ref||`` against the float64 reference, per input dtype.
# fp16 keeps ~11 bits, so rounding the inputs' products and the stored output alone is ~5e-4;
# bf16 keeps 8 bits (~4e-3 per rounding). float64 only checks that two exact implementations
# of the same sums agree.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


@dataclass(frozen=True)
class Case:
    """One SF-Attn problem. ``shift_heads=None`` is the default (half the query heads)."""
    batch: int
    hq: int
    hkv: int
    n: int
    d: int
    group_size: int
    num_sink: int
    shift_heads: int | None
    mode: str
    softmax_scale: float | None = None

    @property
    def id(self):
        shift = "half" if self.shift_heads is None else self.shift_heads
        scale = "" if self.softmax_scale is None else f"-scale{self.softmax_scale}"
        return (f"{self.mode}-B{self.batch}-H{self.hq}/{self.hkv}-N{self.n}-D{self.d}"
                f"-G{self.group_size}-S{self.num_sink}-shift{shift}{scale}")

    def kwargs(self):
        return dict(group_size=self.group_size, num_sink=self.num_sink,
                    shift_heads=self.shift_heads, mode=self.mode,
                    softmax_scale=self.softmax_scale)


# A covering set rather than the cartesian product (the kernels run under Triton's slow
# interpreter on CPU): both modes, S in {0, 4} (plus odd and large S), shift_heads none / half /
# all, GQA 1, 2, 4, N not a multiple of 16 nor of G ("sf"), batch > 1, G >= N, D 16..128.
CASES = [
    Case(2, 4, 4, 37, 16, 8, 4, None, "sf"),
    Case(1, 4, 2, 50, 64, 12, 0, 0, "sf"),
    Case(1, 4, 1, 45, 32, 10, 4, 4, "sf"),
    Case(1, 8, 2, 100, 64, 24, 4, None, "sf"),
    Case(1, 2, 1, 65, 16, 16, 4, None, "sf"),
    Case(2, 2, 2, 80, 64, 20, 0, 2, "sf"),
    Case(1, 2, 2, 17, 16, 6, 3, 1, "sf"),
    Case(1, 2, 1, 64, 16, 8, 20, None, "sf"),
    Case(1, 2, 2, 33, 128, 8, 4, None, "sf"),
    Case(1, 2, 2, 5, 16, 2, 4, None, "sf"),
    # The sink run ends one past a sink-block multiple: G = 2 at N = 3, and S = 80 above the
    # largest sink block (64) with a shifted group starting at 65.
    Case(1, 2, 2, 3, 16, 2, 4, None, "sf"),
    Case(1, 2, 1, 70, 16, 10, 80, None, "sf"),
    Case(1, 1, 1, 1, 16, 2, 4, None, "sf"),
    Case(2, 2, 1, 30, 32, 32, 4, None, "sf"),
    Case(1, 4, 2, 23, 16, 64, 0, 4, "sf"),
    Case(1, 2, 2, 40, 64, 14, 4, None, "sf", softmax_scale=0.3),
    Case(2, 4, 4, 48, 16, 16, 0, None, "s2"),
    Case(1, 4, 2, 64, 64, 16, 4, 4, "s2"),
    Case(1, 2, 1, 40, 16, 8, 4, 0, "s2"),
    Case(1, 4, 1, 96, 32, 32, 4, None, "s2"),
    Case(1, 2, 2, 12, 16, 4, 4, 2, "s2"),
    Case(1, 2, 2, 32, 16, 32, 0, 1, "s2"),
    Case(2, 2, 2, 24, 64, 24, 4, 2, "s2"),
    Case(1, 2, 2, 56, 16, 8, 0, None, "s2", softmax_scale=0.05),
]


def make_inputs(case, dtype, device, requires_grad=False):
    """Fresh ``randn`` q, k, v for ``case`` (never zeros, never structured)."""
    shapes = ((case.batch, case.hq, case.n, case.d), (case.batch, case.hkv, case.n, case.d),
              (case.batch, case.hkv, case.n, case.d))
    return [torch.randn(s, dtype=dtype, device=device).requires_grad_(requires_grad)
            for s in shapes]


def reference_and_grads(q, k, v, d_out, **kwargs):
    """The float64 dense reference output and its (dq, dk, dv) for upstream gradient ``d_out``."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = sf_attention_reference(q64, k64, v64, **kwargs)
    grads = torch.autograd.grad(out, (q64, k64, v64), d_out.double())
    return out.detach(), grads


def assert_close(out, ref, dtype, what):
    """``out`` matches the float64 ``ref`` to ``TOL[dtype]`` as a whole, and no single element
    is far off: a norm alone would hide a few unwritten or wrong elements in a large tensor."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {(~torch.isfinite(out)).sum().item()} non-finite"
    if not ref.any():
        # e.g. dq when every query sees a single key (N = 1): softmax is constant there.
        worst = out.double().abs().max().item()
        assert worst <= TOL[dtype], f"{what}: reference is zero, got max |{what}| {worst:.3g}"
        return
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.3g} ({dtype})"
    worst = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert worst <= 10 * TOL[dtype], (
        f"{what}: worst element error {worst:.3g} of max |ref| > {10 * TOL[dtype]:.3g} ({dtype})"
    )


def pattern_params(hq, n, group_size, num_sink, shift_heads, mode, d=16):
    """Checked SF-Attn params for a shape, without allocating any data (meta tensors)."""
    q = torch.empty(1, hq, n, d, device="meta")
    return check_args(q, q, q, group_size, num_sink, shift_heads, mode, None)


def poison_kernel_outputs(monkeypatch):
    """Makes every buffer the Triton launchers allocate for a kernel to write (o, lse, delta,
    dq, dk, dv) start as NaN, so an element a kernel forgets to write fails the comparison."""
    from sinklora.kernels import sf_attn as launchers

    monkeypatch.setattr(launchers, "new_output", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


def check_against_reference(q, k, v, backend, kwargs):
    """``sf_attention(backend=...)`` and its dq, dk, dv (for a random upstream gradient) match
    the float64 reference to the tolerance of the inputs' dtype."""
    dtype = q.dtype
    out = sf_attention(q, k, v, backend=backend, **kwargs)
    assert out.dtype == q.dtype and out.device == q.device
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    ref, ref_grads = reference_and_grads(q, k, v, d_out, **kwargs)
    assert_close(out, ref, dtype, "out")
    for name, got, want, inp in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.dtype == inp.dtype, name
        assert_close(got, want, dtype, name)
