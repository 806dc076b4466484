"""``make bench``: every benchmark question, then the plots and the summary.

On a CUDA GPU it runs the benchmark's shapes in bf16 (``--full`` for every N; the default is a
subset chosen so that the run, FlexAttention's compilation included, fits a 10-minute call).
Without CUDA it runs small fp32 shapes through the PyTorch paths only: Triton timings need a
GPU (Triton's CPU interpreter is a debugging tool, not a benchmark).

Rows are appended to ``<results dir>/<question>.csv`` (``build/bench`` unless
``--results-dir`` names another); a provider that fails gets an error row and the run goes on.
Exits 0 unless the harness itself breaks.
"""
import sys

from bench import common, h2o_decode, plot, sf_attn, summary

QUESTIONS = ("sf_attn", "h2o_decode")
# Seconds after which no new shape starts: the GPU run must end inside 10 minutes
# (a provider already started, e.g. a FlexAttention compile, still finishes).
GPU_BUDGET_S = 420
CPU_BUDGET_S = 90
SF_SHARE = 0.65


def main(argv=None):
    ap = common.script_parser(__doc__, "every shape of the benchmark (GPU)")
    ap.add_argument("--only", choices=QUESTIONS, nargs="+", default=list(QUESTIONS))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    device, env = common.start(args)
    cuda = device.type == "cuda"
    budget = args.time_budget or (GPU_BUDGET_S if cuda else CPU_BUDGET_S)
    deadline = common.Deadline(budget)
    if not cuda:
        print("No CUDA GPU here: Triton timings need a GPU. This run times only the PyTorch "
              "paths on small fp32 CPU shapes; its numbers say nothing about GPU speed.",
              flush=True)

    if "sf_attn" in args.only:
        share = SF_SHARE if "h2o_decode" in args.only else 1.0
        sf_attn.run(device, args.results_dir / "sf_attn.csv", env,
                    common.Deadline(budget * share),
                    sf_attn.shapes(device, full=args.full, tiny=args.tiny))
    if "h2o_decode" in args.only:
        h2o_decode.run(device, args.results_dir / "h2o_decode.csv", env, deadline,
                       h2o_decode.shapes(device, full=args.full, tiny=args.tiny))

    if not args.no_plot:
        plot.main(["--results-dir", str(args.results_dir), "--run-id", env["run_id"]])
    # A CSV this run did not write (`--only`) keeps its own latest run in the summary.
    summary.main(["--results-dir", str(args.results_dir), "--run-id", env["run_id"]])
    if not cuda:
        print("Triton timings need a GPU: run `make bench` on a CUDA machine for them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
