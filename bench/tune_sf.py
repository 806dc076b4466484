"""Times candidate tiles of the SF-Attn kernels on a GPU, one kernel at a time (issue 5 tuning).

For each kernel (forward, dq, dk/dv) and each candidate ``Tile`` (rows, cols, warps, stages;
see ``sinklora/kernels/sf_attn.py``), the other two kernels keep their default tiles and the
pass that contains the kernel is timed at the benchmark shape (bf16, B=1, Hq=32, Hkv=8, D=128,
N=16k, G=N/4, S=4 by default): the forward pass for forward tiles, the whole backward pass
(delta, dq, dk/dv, sink reduction) for dq and dk/dv tiles. Every candidate's outputs are
gated against the default tiles' outputs first. The compiled kernel's registers and spills are
read from Triton when it exposes them.

Rows go to ``bench/results/tune_sf.csv`` (the benchmark columns; ``provider`` names the
kernel and tile, ``note`` the registers/spills); the script ends with the fastest tile per
kernel next to the default's time. Winners go into ``_TILES`` by hand, after which the compile
test (``tests/kernels``) checks them for spills and shared memory without a GPU. The present
table was chosen without a GPU (spill-free, fits shared memory); this script has not run on a
GPU yet, so how long it takes there is unknown (compilation of 21 tiles dominates).

    PYTHONPATH=$PWD python3 bench/tune_sf.py
    PYTHONPATH=$PWD python3 bench/tune_sf.py --hkv 32 --N 8192
"""
import argparse
import sys
from pathlib import Path

import torch

import common

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
    ap.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
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
        print("tune_sf.py times compiled kernels: it needs a CUDA GPU (without one, --smoke "
              "checks the script under TRITON_INTERPRET=1)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    env = common.environment(device)
    print(common.describe(env), flush=True)
    dtype = getattr(torch, args.dtype)
    n, d, g, s = args.N, args.head_dim, args.N // 4, 4
    shift_heads, scale = args.hq // 2, d ** -0.5
    q = torch.randn(1, args.hq, n, d, device=device, dtype=dtype)
    k = torch.randn(1, args.hkv, n, d, device=device, dtype=dtype)
    v = torch.randn(1, args.hkv, n, d, device=device, dtype=dtype)
    do = torch.randn_like(q)
    shape = {"B": 1, "Hq": args.hq, "Hkv": args.hkv, "N": n, "D": d, "G": g, "S": s,
             "dtype": args.dtype}

    default_tiles = launchers.tiles
    deadline = common.Deadline(args.time_budget)

    def forward():
        return launchers.sf_attn_forward(q, k, v, g, s, shift_heads, False, scale)

    o, lse = forward()

    def backward():
        return launchers.sf_attn_backward(do, q, k, v, o, lse, g, s, shift_heads, False, scale)

    reference = {"fwd": (o,), "bwd": (o, *backward())}
    best = {}
    try:
        for kernel in args.kernels:
            default = default_tiles(d, dtype)[kernel]
            timings = {}
            candidates = (CANDIDATES[kernel][:1] if args.smoke
                          else QUICK[kernel] if args.quick else CANDIDATES[kernel])
            for candidate in map(launchers.Tile._make, candidates):
                if deadline.passed():
                    print(f"time budget used up, skipping {kernel} {candidate}", flush=True)
                    continue
                def patched(head_dim, dt, kernel=kernel, candidate=candidate):
                    return {**default_tiles(head_dim, dt), kernel: candidate}

                launchers.tiles = patched
                pass_name = "fwd" if kernel == "fwd" else "bwd"
                fn = (lambda: forward()[:1]) if kernel == "fwd" else (lambda: (o, *backward()))
                row = {"kernel": "sf_attn_tile", "pass": pass_name, **shape, **env,
                       "provider": f"{kernel}:{candidate.rows}x{candidate.cols}"
                                   f"w{candidate.warps}s{candidate.stages}",
                       "timestamp": common.timestamp()}
                try:
                    common.gate(row["provider"], fn(), reference[pass_name], dtype)
                    row["ms_p20"], row["ms_p50"], row["ms_p80"] = common.time_ms(fn, device)
                    row["note"] = _compiled_usage(launchers, kernel) + (
                        " (default)" if candidate == default else "")
                    timings[candidate] = row["ms_p50"]
                except Exception as exc:  # noqa: BLE001  a tile that fails is a row, not a stop
                    row["error"] = common.short_error(exc)
                    common.free_memory(device, after_failure=True)
                common.print_row(row)
                common.append_rows(args.results_dir / "tune_sf.csv", [row])
            if timings:
                best[kernel] = (min(timings, key=timings.get), timings, default)
    finally:
        launchers.tiles = default_tiles

    print("\nfastest tile per kernel (ms p50 of its pass):")
    for kernel, (winner, timings, default) in best.items():
        base = timings.get(default)
        ratio = f", {base / timings[winner]:.2f}x the default {tuple(default)}" if base else ""
        print(f"  {kernel:<5} {tuple(winner)}: {timings[winner]:.3f} ms{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
