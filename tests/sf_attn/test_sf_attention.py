"""``sinklora.sf_attention``: forward and dq, dk, dv of both backends against the float64 dense
reference, on a covering set of shapes (see ``sf_helpers.CASES``)."""
import pytest
import torch

from conftest import KERNEL_DTYPES
from sf_helpers import (CASES, Case, assert_close, check_against_reference, make_inputs,
                        poison_kernel_outputs, reference_and_grads, rel_err)
from sinklora import sf_attention
from sinklora.kernels.sf_attn import compiled_tiles, sf_attn_backward, sf_attn_forward
from sinklora.sf_attn import sf_attention_reference
from sinklora.sf_attn.params import check_args

# The fallback runs on any floating dtype (it accumulates in at least fp32).
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKEND_DTYPES = ([("torch", dt) for dt in TORCH_DTYPES]
                  + [("triton", dt) for dt in KERNEL_DTYPES])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES,
                         ids=[f"{b}-{str(dt)[6:]}" for b, dt in BACKEND_DTYPES])
def test_forward_backward_match_reference(case, backend, dtype, device, monkeypatch):
    if backend == "triton":
        poison_kernel_outputs(monkeypatch)
    q, k, v = make_inputs(case, dtype, device, requires_grad=True)
    check_against_reference(q, k, v, backend, case.kwargs())


def test_auto_backend_on_cpu_is_the_fallback():
    case = CASES[0]
    q, k, v = make_inputs(case, torch.float32, "cpu", requires_grad=True)
    auto = sf_attention(q, k, v, backend="auto", **case.kwargs())
    fallback = sf_attention(q, k, v, backend="torch", **case.kwargs())
    assert torch.equal(auto, fallback)
    d_out = torch.randn_like(auto)
    for g_auto, g_torch in zip(torch.autograd.grad(auto, (q, k, v), d_out),
                               torch.autograd.grad(fallback, (q, k, v), d_out)):
        assert torch.equal(g_auto, g_torch)


def test_default_arguments_are_four_sinks_half_the_heads_shifted_sf_mode(device):
    case = CASES[0]
    q, k, v = make_inputs(case, torch.float32, device)
    out = sf_attention(q, k, v, group_size=case.group_size)
    ref = sf_attention_reference(q, k, v, group_size=case.group_size, num_sink=4,
                                 shift_heads=case.hq // 2, mode="sf",
                                 softmax_scale=case.d ** -0.5)
    assert_close(out, ref, torch.float32, "out")


@pytest.mark.parametrize("layout", ["bnhd", "strided-d"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(layout, backend, device, monkeypatch):
    """transformers hands attention q/k/v as ``[B, N, H, D]`` transposed to ``[B, H, N, D]``;
    a view with a strided head dim must work too (copied, never read wrongly)."""
    if backend == "triton":
        poison_kernel_outputs(monkeypatch)
    case = Case(2, 4, 2, 27, 16, 8, 4, None, "sf")
    if layout == "bnhd":
        q, k, v = (torch.randn(case.batch, case.n, h, case.d, device=device).transpose(1, 2)
                   for h in (case.hq, case.hkv, case.hkv))
    else:
        q, k, v = (torch.randn(case.batch, h, case.n, 2 * case.d, device=device)[..., ::2]
                   for h in (case.hq, case.hkv, case.hkv))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert not any(t.is_contiguous() for t in (q, k, v))
    check_against_reference(q, k, v, backend, case.kwargs())


# Tiles larger than a group, BLOCK_M != BLOCK_N, a query tile spanning several groups and the
# sink block: the compiled tile sizes, which the interpreter would otherwise never run.
COMPILED_TILE_CASES = [
    Case(1, 4, 2, 100, 64, 24, 4, None, "sf"),
    Case(1, 2, 1, 160, 32, 40, 4, 1, "s2"),
    Case(1, 2, 2, 70, 16, 6, 20, None, "sf"),
    Case(1, 2, 2, 37, 128, 64, 4, None, "sf"),
    Case(1, 2, 2, 50, 256, 16, 4, 2, "sf"),
]


@pytest.mark.parametrize("case", COMPILED_TILE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_compiled_tile_sizes(case, dtype, device, monkeypatch):
    """The launchers at the tiles they compile with on a GPU, passed explicitly, against the
    float64 reference: out, and dq, dk, dv for a random upstream gradient."""
    poison_kernel_outputs(monkeypatch)
    q, k, v = make_inputs(case, dtype, device)
    p = check_args(q, k, v, **case.kwargs())
    pattern = (p.group_size, p.num_sink, p.shift_heads, p.mode == "s2", p.softmax_scale)
    tiles = compiled_tiles(case.d, dtype)
    out, lse = sf_attn_forward(q, k, v, *pattern, tile=tiles["fwd"])
    d_out = torch.randn_like(out)
    grads = sf_attn_backward(d_out, q, k, v, out, lse, *pattern, tiles=tiles)
    ref, ref_grads = reference_and_grads(q, k, v, d_out, **case.kwargs())
    assert out.dtype == dtype and out.device == q.device
    assert_close(out, ref, dtype, "out")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_backward_stays_finite_where_the_gradients_fit_fp16(backend, device):
    """Tiny q, k and values near fp16's limit: dS (before the softmax scale) passes 65504 while
    every gradient stays below 1000; the 16-bit products take the scaled dS."""
    case = Case(1, 2, 2, 64, 64, 2, 4, None, "sf")
    q, k = (torch.randn(1, 2, 64, 64, device=device) * 0.01 for _ in range(2))
    v = (torch.randn(1, 2, 64, 64, device=device) * 2e4).clamp(-6e4, 6e4)
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    check_against_reference(q, k, v, backend, case.kwargs())


def test_launchers_run_the_tiles_they_are_given(monkeypatch):
    """Each kernel is launched with the rows, cols, warps and stages of the tile passed in (a
    launcher falling back to its default tiles would pass every value test)."""
    from sinklora.kernels import sf_attn as launchers

    launched = {}

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched[self.name] = (grid[0], kwargs)
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_sf_attn_fwd_kernel", "_sf_attn_bwd_dq_kernel", "_sf_attn_bwd_dkdv_kernel"):
        monkeypatch.setattr(launchers, name, Recorder(name, getattr(launchers, name)))
    case = Case(1, 2, 1, 96, 16, 32, 4, None, "sf")
    q, k, v = make_inputs(case, torch.float32, "cpu")
    p = check_args(q, k, v, **case.kwargs())
    pattern = (p.group_size, p.num_sink, p.shift_heads, False, p.softmax_scale)
    chosen = {"fwd": launchers.Tile(32, 16, 2, 1), "dq": launchers.Tile(16, 32, 1, 2),
              "dkdv": launchers.Tile(32, 32, 2, 2)}
    out, lse = sf_attn_forward(q, k, v, *pattern, tile=chosen["fwd"])
    sf_attn_backward(torch.randn_like(out), q, k, v, out, lse, *pattern, tiles=chosen)
    for name, kernel, own, walked in (("_sf_attn_fwd_kernel", "fwd", "BLOCK_M", "BLOCK_N"),
                                      ("_sf_attn_bwd_dq_kernel", "dq", "BLOCK_M", "BLOCK_N"),
                                      ("_sf_attn_bwd_dkdv_kernel", "dkdv", "BLOCK_N", "BLOCK_M")):
        blocks, kwargs = launched[name]
        tile = chosen[kernel]
        assert blocks == -(-case.n // tile.rows), name
        assert (kwargs[own], kwargs[walked], kwargs["num_warps"], kwargs["num_stages"]) == tile


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-4), (torch.bfloat16, 4e-3)])
def test_fallback_accumulates_in_float32(dtype, tol):
    """The general 16-bit tolerances leave room for a fallback that sums in the input dtype (its
    error at a 512-key group is about 5x the fp32-accumulated one): a long group pins it."""
    case = Case(1, 2, 2, 1024, 64, 512, 4, None, "sf")
    q, k, v = make_inputs(case, dtype, "cpu")
    q = q * 3  # peaked attention, as trained models have: rounding in the sums shows more
    ref = sf_attention_reference(*(t.double() for t in (q, k, v)), **case.kwargs())
    out = sf_attention(q, k, v, backend="torch", **case.kwargs())
    assert rel_err(out, ref) < tol
