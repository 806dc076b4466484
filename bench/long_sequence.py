"""Long sequences: SF-Attn forward + backward where a head spans more than 2**31 elements, and
at N = 128k, checked against float64 on the rows and keys that can be checked exactly.

Why the check is exact on a slice: the last group of an unshifted head, ``[gs, N)``, is seen
only by its own queries, and those queries see only it and the sinks. So for the query heads of
kv head 0 (all unshifted when ``shift_heads <= Hq - Hq/Hkv``), out and dq of the rows ``[gs, N)``
and dk, dv of the keys ``[gs, N)`` of kv head 0 come from a small dense float64 problem:
``sinks + [gs, N)`` keys, computed here in query chunks so that it stays small at 128k.

The inputs use transformers' layout (``[B, N, H, D]`` transposed to ``[B, H, N, D]``): one
head's rows are ``H * D`` elements apart, so at N = 540k the row offsets inside a head pass
2**31 as well as the batch/head offsets.

On CUDA (bf16): the two shapes below, each timed once (a second call: the first compiles),
with the absolute peak memory, inputs included, in ``peak_mem_mb`` (does the shape fit).
Without CUDA, ``--cpu`` runs a small version of the same check under the Triton interpreter.
Rows go to ``<results dir>/long_sequence.csv``.
"""
import time

import torch

from bench import common  # sets TRITON_INTERPRET (1 without CUDA) before sinklora's kernels
from bench.sf_attn import Shape
from sinklora import sf_attention
from sinklora.kernels.pattern import plain

GPU_CASES = [
    # q has 2.2e9 elements, and the rows of one head pass 2**31
    Shape(1, 32, 8, 540672, 128, 4096, 4, torch.bfloat16),
    Shape(1, 32, 8, 131072, 128, 32768, 4, torch.bfloat16),  # N = 128k, LongLoRA's G = N / 4
]
CPU_CASES = [Shape(1, 4, 2, 300, 16, 128, 4, torch.float16)]
ROW_CHUNK = 1024


def make_inputs(b, hq, hkv, n, d, dtype, device):
    """q, k, v in transformers' layout: ``[B, N, H, D]`` storage seen as ``[B, H, N, D]``."""
    def one(heads):
        t = torch.randn(b, n, heads, d, dtype=dtype, device=device).transpose(1, 2)
        return t.requires_grad_()
    return one(hq), one(hkv), one(hkv)


def local_reference(q, k, v, d_out, group_size, num_sink, softmax_scale):
    """float64 out, dq (rows ``[gs, N)``) and dk, dv (keys ``[gs, N)``) of the query heads of
    kv head 0, from the sinks and the last unshifted group only."""
    n = q.shape[2]
    rep = q.shape[1] // k.shape[1]
    gs = plain.group_start(n - 1, group_size, 0)
    key_idx = torch.cat([torch.arange(min(num_sink, gs)), torch.arange(gs, n)]).to(q.device)
    kk = k[:, 0].detach().index_select(1, key_idx).double().requires_grad_()
    vv = v[:, 0].detach().index_select(1, key_idx).double().requires_grad_()
    outs, dqs = [], []
    for start in range(gs, n, ROW_CHUNK):
        rows = torch.arange(start, min(start + ROW_CHUNK, n), device=q.device)
        qq = q[:, :rep].detach().index_select(2, rows).double().requires_grad_()
        mask = plain.visible(rows[:, None], key_idx[None, :], group_size, 0, num_sink, n, n)
        scores = (qq @ kk.transpose(-1, -2).unsqueeze(1)) * softmax_scale
        out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vv.unsqueeze(1)
        # dk / dv accumulate over the chunks in the shared leaves kk, vv.
        out.backward(d_out[:, :rep].index_select(2, rows).double())
        outs.append(out.detach())
        dqs.append(qq.grad)
    group = slice(min(num_sink, gs), None)  # the group keys, after the sinks
    return gs, torch.cat(outs, 2), torch.cat(dqs, 2), kk.grad[:, group], vv.grad[:, group]


def run_case(shape, device, row):
    """``row`` with the timing and the check of one forward + backward at ``shape``."""
    b, hq, hkv, n, d, g, s, dtype = (shape.B, shape.Hq, shape.Hkv, shape.N, shape.D, shape.G,
                                     shape.S, shape.dtype)
    scale = d ** -0.5
    kwargs = dict(group_size=g, num_sink=s, softmax_scale=scale, backend="triton")
    q, k, v = make_inputs(b, hq, hkv, n, d, dtype, device)
    d_out = torch.randn(q.shape, dtype=dtype, device=device)
    # One untimed call first: it compiles the kernels for exactly these arguments (offsets
    # past 2**31 make some of them 64-bit, another specialization than any smaller shape's).
    torch.autograd.grad(sf_attention(q, k, v, **kwargs), (q, k, v), d_out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    common.synchronize(device)
    start = time.perf_counter()
    out = sf_attention(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    common.synchronize(device)
    ms = 1e3 * (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    gs, ref_out, ref_dq, ref_dk, ref_dv = local_reference(q, k, v, d_out, g, s, scale)
    rep = hq // hkv
    errors = {
        "out": common.rel_err(out[:, :rep, gs:], ref_out),
        "dq": common.rel_err(dq[:, :rep, gs:], ref_dq),
        "dk": common.rel_err(dk[:, 0, gs:], ref_dk),
        "dv": common.rel_err(dv[:, 0, gs:], ref_dv),
    }
    finite = all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv))
    tolerance = common.GATE_TOLERANCE[dtype]
    ok = finite and max(errors.values()) <= tolerance
    span = (n - 1) * q.stride(2) + (hq - 1) * q.stride(1)
    note = (f"one pass after a compiling one, not do_bench; checked rows/keys [{gs}, {n}) of "
            f"kv head 0: "
            + ", ".join(f"{name} {err:.2e}" for name, err in errors.items())
            + f" (tol {tolerance:g}); max element offset {span}"
            + ("" if finite else "; NON-FINITE values"))
    return dict(row, **common.quantile_columns([ms] * 3), peak_mem_mb=peak, note=note,
                timestamp=common.timestamp(),
                error=None if ok else "mismatch against the float64 slice")


def main(argv=None):
    ap = common.script_parser(__doc__, "(no effect: the GPU cases are the benchmark's)")
    ap.add_argument("--N", type=int, nargs="+", choices=[case.N for case in GPU_CASES],
                    help="the GPU cases of these sequence lengths only (default: all)")
    args = ap.parse_args(argv)
    device, env = common.start(args)
    if device.type == "cuda":
        cases = [c for c in GPU_CASES if not args.N or c.N in args.N]
    else:
        print("No CUDA GPU: a small version under the Triton interpreter (a check, not a "
              "benchmark).", flush=True)
        cases = CPU_CASES

    def bench(name, shape, base_row):
        row = dict(base_row, provider=name, **{"pass": "fwd+bwd"})
        try:
            return [run_case(shape, device, row)]
        except Exception as exc:  # noqa: BLE001  an OOM on one shape must not hide the others
            return [common.failed(row, f"long_sequence {shape}", exc)]

    rows = common.run("sf_attn_long", device, args.results_dir / "long_sequence.csv", env,
                      common.Deadline(args.time_budget), cases, ["sinklora_triton"],
                      lambda shape: shape, bench)
    return 0 if all(not r.get("error") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
