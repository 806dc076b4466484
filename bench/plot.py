"""Draws one PNG per benchmark question from its CSV: milliseconds against N, one line per
provider (the p20..p80 band shaded), one panel per pass and shape.

Only the latest run in each CSV is drawn (or the one named by ``--run-id``, in a CSV that
holds it), so runs on different machines or commits never share a plot.

    python -m bench.plot [--results-dir bench/results] [--run-id ISO-TIMESTAMP]
"""
import argparse
import sys
from collections import defaultdict

from bench import common

# Columns that, with the pass, tell one panel from another.
PANEL_COLUMNS = ("B", "Hq", "Hkv", "D", "dtype")
PASS_ORDER = ("fwd", "bwd", "fwd+bwd", "decode", "prefill")


def panels(rows):
    """``{(pass, panel key): {provider: [(N, p20, p50, p80), ...]}}`` sorted by N."""
    out = defaultdict(lambda: defaultdict(list))
    for r in filter(common.is_timed, rows):
        key = (r["pass"],) + tuple(r[c] for c in PANEL_COLUMNS)
        out[key][r["provider"]].append(
            (int(r["N"]), float(r["ms_p20"]), float(r["ms_p50"]), float(r["ms_p80"])))
    for lines in out.values():
        for points in lines.values():
            points.sort()
    return out


def draw(rows, png_path):
    """Writes the plot of ``rows`` (one run of one question) to ``png_path``; returns whether
    there was anything to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_panel = panels(rows)
    if not by_panel:
        return False
    passes = sorted({k[0] for k in by_panel}, key=lambda p: (PASS_ORDER + (p,)).index(p))
    shapes = sorted({k[1:] for k in by_panel})
    # One colour per provider in every panel.
    providers = sorted({p for lines in by_panel.values() for p in lines})
    colors = dict(zip(providers, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    fig, axes = plt.subplots(len(shapes), len(passes), squeeze=False,
                             figsize=(4.5 * len(passes), 3.6 * len(shapes)))
    for row_i, shape in enumerate(shapes):
        for col_i, pass_ in enumerate(passes):
            ax = axes[row_i][col_i]
            for provider, points in sorted(by_panel.get((pass_,) + shape, {}).items()):
                n, p20, p50, p80 = zip(*points)
                ax.plot(n, p50, marker="o", label=provider, color=colors[provider])
                ax.fill_between(n, p20, p80, color=colors[provider], alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{pass_}  " + " ".join(f"{c}={v}" for c, v in zip(PANEL_COLUMNS, shape)),
                         fontsize=9)
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel("ms (p50; band p20..p80)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(f"{first['kernel']} on {first['device']}  (torch {first['torch']}, "
                 f"triton {first['triton']}, sha {first['git_sha']}, run {first['run_id']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="one PNG per benchmark CSV")
    common.add_results_dir(ap)
    ap.add_argument("--run-id", help="draw this run instead of the latest")
    args = ap.parse_args(argv)
    for csv_path in common.result_csvs(args.results_dir):
        rows = common.latest_run(common.read_rows(csv_path), args.run_id)
        png = csv_path.with_suffix(".png")
        if draw(rows, png):
            print(f"wrote {png}")
        else:
            print(f"{csv_path.name}: no timed rows in the selected run, no plot")


if __name__ == "__main__":
    sys.exit(main())
