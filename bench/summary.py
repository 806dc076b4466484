"""Tables of the latest run and the issue's target ratios, as Markdown (for bench/RESULTS.md).

Reads the CSVs in the results folder, takes each one's latest run (``plot.latest_run``), prints
and writes ``summary.md`` there: one table per question, then one line per target with the
measured ratio. Only ratios between rows of the same run are formed.

    python bench/summary.py [--results-dir bench/results]
"""
import argparse
import sys
from pathlib import Path

import torch

import common
from plot import latest_run

SF_TABLE = ("provider", "pass", "Hkv", "N", "ms_p50", "tflops", "peak_mem_mb", "note", "error")
H2O_TABLE = ("provider", "pass", "B", "Hq", "Hkv", "N", "budget", "ms_p50", "gb_s", "kv_bytes",
             "peak_mem_mb", "note", "error")


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(r.get(c, "").replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


def _index(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows if r["ms_p50"] and not r["error"]}


def sf_targets(rows):
    """Lines for the SF-Attn targets (fwd+bwd, bf16, per Hkv and N)."""
    rows = [r for r in rows if r["pass"] == "fwd+bwd"]
    by = _index(rows, "provider", "Hkv", "N")
    lines = []
    for (provider, hkv, n), ours in sorted(by.items(), key=lambda kv: (kv[0][1], int(kv[0][2]))):
        if provider != "sinklora_triton":
            continue
        ms = float(ours["ms_p50"])

        def other(name):
            return by.get((name, hkv, n))

        flex, sdpa, longlora = other("flex"), other("sdpa_causal"), other("longlora_s2")
        where = f"Hkv={hkv} N={n}"
        if flex and int(n) >= 8192:
            lines.append(_target(f"{where}: FlexAttention / sinklora fwd+bwd time",
                                 float(flex["ms_p50"]) / ms, ">=", 1.2))
        if sdpa and int(n) == 16384:
            lines.append(_target(f"{where}: dense causal SDPA / sinklora fwd+bwd time",
                                 float(sdpa["ms_p50"]) / ms, ">=", 3.0))
        if sdpa:
            lines.append(_target(f"{where}: sinklora / SDPA useful TFLOP/s",
                                 float(ours["tflops"]) / float(sdpa["tflops"]), ">=", 0.7))
        if longlora:
            lines.append(_target(f"{where}: LongLoRA / sinklora fwd+bwd time",
                                 float(longlora["ms_p50"]) / ms, ">=", 1.5))
            if ours["peak_mem_mb"] and longlora["peak_mem_mb"]:
                lines.append(_target(f"{where}: sinklora / LongLoRA peak memory",
                                     float(ours["peak_mem_mb"]) / float(longlora["peak_mem_mb"]),
                                     "<", 1.0))
    return lines


def h2o_targets(rows):
    """Lines for the H2O target (50% budget, 16k context, B=8, decode step vs full cache) and
    the prefill's score-pass overhead (no target number in the issue)."""
    prefill = _index([r for r in rows if r["pass"] == "prefill"], "provider", "B", "Hq", "Hkv", "N")
    lines = []
    for (provider, b, hq, hkv, n), ours in sorted(prefill.items()):
        plain = prefill.get(("sdpa_prefill", b, hq, hkv, n))
        if provider == "sinklora_h2o_prefill_50" and plain:
            ratio = float(ours["ms_p50"]) / float(plain["ms_p50"])
            lines.append(f"- B={b} Hq={hq} Hkv={hkv} N={n}: H2O prefill / causal SDPA prefill "
                         f"time: {ratio:.2f} (the score pass's overhead; no target)")
    rows = [r for r in rows if r["pass"] == "decode"]
    by = _index(rows, "provider", "B", "Hq", "Hkv", "N")
    for (provider, b, hq, hkv, n), ours in sorted(by.items()):
        if provider != "sinklora_h2o_50" or b != "8" or n != "16384":
            continue
        full = by.get(("full_sdpa", b, hq, hkv, n))
        where = f"B={b} Hq={hq} Hkv={hkv} N={n}"
        if full:
            lines.append(_target(f"{where}: sinklora H2O 50% / full-cache SDPA step time",
                                 float(ours["ms_p50"]) / float(full["ms_p50"]), "<=", 0.6))
        if ours["kv_bytes"] and ours["budget"]:
            itemsize = getattr(torch, ours["dtype"]).itemsize
            expected = 2 * int(b) * int(hkv) * int(ours["budget"]) * int(ours["D"]) * itemsize
            lines.append(f"- {where}: stored KV bytes {ours['kv_bytes']} vs the budget's "
                         f"{expected} (K and V): "
                         f"{'met' if int(ours['kv_bytes']) == expected else 'MISSED'}")
    return lines


def _target(label, value, op, goal):
    met = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
    return f"- {label}: {value:.2f} (target {op} {goal}): {'met' if met else 'MISSED'}"


def summarize(results_dir, run_id=None):
    """The Markdown summary of run ``run_id`` (default: the latest) of every CSV in
    ``results_dir``."""
    parts = []
    for name, columns, targets in (("sf_attn", SF_TABLE, sf_targets),
                                   ("h2o_decode", H2O_TABLE, h2o_targets)):
        path = Path(results_dir) / f"{name}.csv"
        if not path.exists():
            continue
        rows = latest_run(common.read_rows(path), run_id)
        if not rows:
            continue
        first = rows[0]
        parts.append(f"## {name}\n\ndevice: {first['device']}; torch {first['torch']}, "
                     f"triton {first['triton']}, transformers {first['transformers']}; "
                     f"git sha {first['git_sha']}; run {first['run_id']}\n")
        parts.append(markdown_table(rows, columns) + "\n")
        lines = targets(rows)
        if lines:
            parts.append("Targets:\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Markdown tables and target ratios of the latest run")
    ap.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--run-id", help="summarize this run instead of the latest")
    args = ap.parse_args(argv)
    text = summarize(args.results_dir, args.run_id)
    (args.results_dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
