"""Times candidate tiles of the SF-Attn kernels on a GPU, one kernel at a time.

For each kernel (forward, dq, dk/dv) and each candidate ``Tile`` (rows, cols, warps, stages;
see ``sinklora/kernels/sf_attn.py``), the other two kernels keep their default tiles and the
pass that contains the kernel is timed at the benchmark shape (bf16, B=1, Hq=32, Hkv=8, D=128,
N=16k, G=N/4, S=4 by default): the forward pass for forward tiles, the whole backward pass
(delta, dq, dk/dv, sink reduction) for dq and dk/dv tiles. Every candidate's outputs are
gated against the default tiles' outputs first. The compiled kernel's registers and spills are
read from Triton when it exposes them.

Rows go to ``<results dir>/tune_sf.csv`` (the benchmark columns; ``provider`` names the
kernel and tile, ``note`` the registers/spills); the script ends with the fastest tile per
kernel next to the default's time. Winners go into ``_TILES`` by hand, after which the compile
test (``tests/kernels``) checks them for spills and shared memory without a GPU. The present
table was chosen without a GPU (spill-free, fits shared memory); this script has not run on a
GPU yet, so how long it takes there is unknown (compilation of 21 tiles dominates).

    python3 -m bench.tune_sf
    python3 -m bench.tune_sf --hkv 32 --N 8192
"""
import argparse
import sys

import torch

from bench import common
from bench.sf_attn import Shape

KERNELS = ("fwd", "dq", "dkdv")
# Candidates per kernel for 16-bit D=128, (rows, cols, warps, stages). Forward and dq own a
# query block and walk key blocks; dk/dv own a key block and walk query blocks. All compile for
# sm_90 without register spills (ptxas of triton 3.6, 3.8 and 3.9, checked by hand on CPU)
# except dk/dv's 64x64, which spills (72 to 108 bytes) and shows what a small spill costs, and
# under triton 3.6 (the GPU machine's) the forward's 64x128 (16 bytes).
CANDIDATES = {
    "fwd": [(64, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 2), (128, 32, 8, 3),
            (128, 32, 8, 4), (128, 64, 8, 2), (128, 64, 8, 3)],
    "dq": [(64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4),
           (128, 64, 8, 2), (128, 64, 8, 3)],
    "dkdv": [(64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3),
             (128, 32, 8, 4)],
}
# A handful per kernel for a short run (``--quick``): today's tile first, so that a run cut
# short by its time budget still has the base of the ratio.
QUICK = {
    "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3)],
    "dkdv": [(128, 32, 8, 3), (64, 32, 8, 3), (128, 32, 8, 2)],
}
KERNEL_FUNCTIONS = {"fwd": "_sf_attn_fwd_kernel", "dq": "_sf_attn_bwd_dq_kernel",
                    "dkdv": "_sf_attn_bwd_dkdv_kernel"}


def _compiled_usage(launchers, kernel):
    """``regs=.. spills=..`` of the kernel compiled last, from Triton's JIT cache (internal:
    empty when this Triton keeps it elsewhere)."""
    try:
        jit = getattr(launchers, KERNEL_FUNCTIONS[kernel])
        compiled = list(next(iter(jit.device_caches.values()))[0].values())[-1]
        return f"regs={compiled.n_regs} spills={compiled.n_spills}"
    except Exception:  # noqa: BLE001  informational only
        return ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    common.add_results_dir(ap)
    ap.add_argument("--quick", action="store_true",
                    help="a handful of candidates per kernel (QUICK), today's tile first")
    ap.add_argument("--time-budget", type=float,
                    help="seconds after which no new candidate starts")
    ap.add_argument("--smoke", action="store_true",
                    help="one candidate per kernel at a tiny fp16 shape: checks the script "
                         "(on CPU under TRITON_INTERPRET=1), times nothing meaningful")
    args = ap.parse_args(argv)
    from sinklora.kernels import sf_attn as launchers
    from sinklora.kernels.common import interpreted

    if args.smoke:
        common.quick_cpu_timing()
        args.N, args.hq, args.hkv, args.head_dim, args.dtype = 64, 4, 2, 16, "float16"
    cuda = torch.cuda.is_available()
    if not cuda and not (args.smoke and interpreted()):
        print("bench.tune_sf times compiled kernels: it needs a CUDA GPU (without one, --smoke "
              "checks the script under TRITON_INTERPRET=1)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    env = common.environment(device)
    print("\n".join(common.describe(env)), flush=True)
    dtype = getattr(torch, args.dtype)
    shape = Shape(1, args.hq, args.hkv, args.N, args.head_dim, args.N // 4, 4, dtype)
    n, d, g, s = shape.N, shape.D, shape.G, shape.S
    shift_heads, scale = shape.Hq // 2, d ** -0.5
    default = launchers.tiles(d, dtype)
    candidates = {}  # provider name -> (kernel, tile)
    for kernel in args.kernels:
        for tile in (CANDIDATES[kernel][:1] if args.smoke
                     else QUICK[kernel] if args.quick else CANDIDATES[kernel]):
            tile = launchers.Tile._make(tile)
            candidates[f"{kernel}:{tile.rows}x{tile.cols}w{tile.warps}s{tile.stages}"] = (
                kernel, tile)

    def prepare(shape):
        q = torch.randn(1, shape.Hq, n, d, device=device, dtype=dtype)
        k = torch.randn(1, shape.Hkv, n, d, device=device, dtype=dtype)
        v = torch.randn(1, shape.Hkv, n, d, device=device, dtype=dtype)
        do = torch.randn_like(q)

        def forward(tiles=default):
            return launchers.sf_attn_forward(q, k, v, g, s, shift_heads, False, scale,
                                             tile=tiles["fwd"])

        o, lse = forward()

        def backward(tiles=default):
            return launchers.sf_attn_backward(do, q, k, v, o, lse, g, s, shift_heads, False,
                                              scale, tiles=tiles)

        passes = {"fwd": lambda tiles: forward(tiles)[:1],
                  "bwd": lambda tiles: (o, *backward(tiles))}
        return passes, {"fwd": (o,), "bwd": (o, *backward())}

    def bench(name, inputs, base_row):
        passes, reference = inputs
        kernel, candidate = candidates[name]
        pass_name = "fwd" if kernel == "fwd" else "bwd"
        row = dict(base_row, provider=name, **{"pass": pass_name})
        chosen = {**default, kernel: candidate}  # the other kernels keep today's tiles

        def run():
            return passes[pass_name](chosen)

        try:
            common.gate(name, run(), reference[pass_name], dtype)
            row.update(common.quantile_columns(common.time_ms(run, device)),
                       timestamp=common.timestamp(), note=_compiled_usage(launchers, kernel)
                       + (" (default)" if candidate == default[kernel] else ""))
        except Exception as exc:  # noqa: BLE001  a tile that fails is a row, not a stop
            row = common.failed(row, name, exc)
        return [row]

    rows = common.run("sf_attn_tile", device, args.results_dir / "tune_sf.csv", env,
                      common.Deadline(args.time_budget), [shape], list(candidates), prepare,
                      bench)
    best = {}
    for kernel in args.kernels:
        timings = {candidates[r["provider"]][1]: r["ms_p50"] for r in rows
                   if not r.get("error") and candidates[r["provider"]][0] == kernel}
        if timings:
            best[kernel] = (min(timings, key=timings.get), timings, default[kernel])

    print("\nfastest tile per kernel (ms p50 of its pass):")
    for kernel, (winner, timings, default) in best.items():
        base = timings.get(default)
        ratio = f", {base / timings[winner]:.2f}x the default {tuple(default)}" if base else ""
        print(f"  {kernel:<5} {tuple(winner)}: {timings[winner]:.3f} ms{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
