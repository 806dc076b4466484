"""Tables of the latest run and the benchmark's target ratios, as Markdown (for bench/RESULTS.md).

Reads the CSVs in the results folder, takes each one's latest run (``common.latest_run``), prints
and writes ``summary.md`` there: one table per question, then one line per target with the
measured ratio. Only ratios between rows of the same run are formed.

    python -m bench.summary [--results-dir bench/results]
"""
import argparse
import sys
from pathlib import Path

import torch

from bench import common

SF_TABLE = ("provider", "pass", "Hkv", "N", "ms_p50", "tflops", "peak_mem_mb", "note", "error")
H2O_TABLE = ("provider", "pass", "B", "Hq", "Hkv", "N", "budget", "ms_p50", "gb_s", "kv_bytes",
             "peak_mem_mb", "note", "error")


def _index(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows if common.is_timed(r)}


def _not_measured(where, rows, providers):
    """A line for a target some of whose ``providers`` have no timed row among the shape's
    ``rows`` (missing or failed), with the error where a row failed: never silently dropped."""
    timed = {r["provider"] for r in rows if common.is_timed(r)}
    errors = {r["provider"]: r["error"] for r in rows if r["error"]}
    what = ", ".join(f"{p} ({errors.get(p, 'no row')})" for p in providers if p not in timed)
    return f"- {where}: not measured: {what}: target not checked"


def _ratio(column, mine_over_theirs=False):
    """``theirs / ours`` (or ``ours / theirs``) of a numeric column, None where either is empty."""
    def ratio(ours, theirs):
        if not (ours[column] and theirs[column]):
            return None
        a, b = float(ours[column]), float(theirs[column])
        return a / b if mine_over_theirs else b / a
    return ratio


# The SF-Attn targets: (provider compared, label, ratio, op, goal, the N it applies to).
SF_GOALS = (
    ("flex", "FlexAttention / sinklora fwd+bwd time", _ratio("ms_p50"), ">=", 1.5,
     lambda n: n >= 8192),
    ("sdpa_causal", "dense causal SDPA / sinklora fwd+bwd time", _ratio("ms_p50"), ">=", 3.0,
     lambda n: n == 16384),
    ("sdpa_causal", "sinklora / SDPA useful TFLOP/s", _ratio("tflops", True), ">=", 0.7,
     lambda n: True),
    ("longlora_s2", "LongLoRA / sinklora fwd+bwd time", _ratio("ms_p50"), ">=", 2.0,
     lambda n: True),
    ("longlora_s2", "sinklora / LongLoRA peak memory", _ratio("peak_mem_mb", True), "<", 1.0,
     lambda n: True),
)


def sf_targets(rows):
    """Lines for the SF-Attn targets (fwd+bwd, bf16, per Hkv and N of the run). On a GPU run,
    a target whose rows are missing or failed gets a "not measured" line."""
    rows = [r for r in rows if r["pass"] == "fwd+bwd"]
    by = _index(rows, "provider", "Hkv", "N")
    gpu = any(r["device"] != "cpu" for r in rows)
    lines = []
    for hkv, n in sorted({(r["Hkv"], r["N"]) for r in rows}, key=lambda s: (s[0], int(s[1]))):
        where = f"Hkv={hkv} N={n}"
        ours = by.get(("sinklora_triton", hkv, n))
        for name, label, ratio, op, goal, applies in SF_GOALS:
            if not applies(int(n)):
                continue
            theirs = by.get((name, hkv, n))
            if ours is None or theirs is None:
                if gpu:
                    shape_rows = [r for r in rows if (r["Hkv"], r["N"]) == (hkv, n)]
                    lines.append(_not_measured(f"{where}: {label}", shape_rows,
                                               ("sinklora_triton", name)))
                continue
            value = ratio(ours, theirs)
            if value is not None:
                lines.append(_target(f"{where}: {label}", value, op, goal))
    return lines


def h2o_targets(rows):
    """Lines for the H2O targets: the decode step at a 50% budget, 16k context, B=8, against the
    full cache; the prefill with its score pass against plain causal SDPA."""
    prefill = _index([r for r in rows if r["pass"] == "prefill"], "provider", "B", "Hq", "Hkv", "N")
    lines = []
    for (provider, b, hq, hkv, n), ours in sorted(prefill.items()):
        plain = prefill.get(("sdpa_prefill", b, hq, hkv, n))
        if provider == "sinklora_h2o_prefill_50" and plain:
            ratio = float(ours["ms_p50"]) / float(plain["ms_p50"])
            lines.append(_target(f"B={b} Hq={hq} Hkv={hkv} N={n}: H2O prefill / causal SDPA "
                                 "prefill time", ratio, "<=", 1.3))
    rows = [r for r in rows if r["pass"] == "decode"]
    by = _index(rows, "provider", "B", "Hq", "Hkv", "N")
    gpu = any(r["device"] != "cpu" for r in rows)
    for b, hq, hkv, n in sorted({(r["B"], r["Hq"], r["Hkv"], r["N"]) for r in rows}):
        if b != "8" or n != "16384":
            continue
        ours = by.get(("sinklora_h2o_50", b, hq, hkv, n))
        full = by.get(("full_sdpa", b, hq, hkv, n))
        where = f"B={b} Hq={hq} Hkv={hkv} N={n}"
        if ours is None or full is None:
            if gpu:
                mine = [r for r in rows if (r["B"], r["Hq"], r["Hkv"], r["N"]) == (b, hq, hkv, n)]
                lines.append(_not_measured(f"{where}: H2O 50% vs full cache", mine,
                                           ("sinklora_h2o_50", "full_sdpa")))
        else:
            lines.append(_target(f"{where}: sinklora H2O 50% / full-cache SDPA step time",
                                 float(ours["ms_p50"]) / float(full["ms_p50"]), "<=", 0.6))
        if ours is not None and ours["kv_bytes"] and ours["budget"]:
            itemsize = getattr(torch, ours["dtype"]).itemsize
            expected = 2 * int(b) * int(hkv) * int(ours["budget"]) * int(ours["D"]) * itemsize
            lines.append(f"- {where}: stored KV bytes {ours['kv_bytes']} vs the budget's "
                         f"{expected} (K and V): "
                         f"{'met' if int(ours['kv_bytes']) == expected else 'MISSED'}")
    return lines


def _target(label, value, op, goal):
    met = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
    return f"- {label}: {value:.3f} (target {op} {goal}): {'met' if met else 'MISSED'}"


def summarize(results_dir, run_id=None):
    """The Markdown summary of run ``run_id`` (default: the latest) of every CSV in
    ``results_dir``."""
    parts = []
    for name, columns, targets in (("sf_attn", SF_TABLE, sf_targets),
                                   ("h2o_decode", H2O_TABLE, h2o_targets)):
        path = Path(results_dir) / f"{name}.csv"
        if not path.exists():
            continue
        rows = common.latest_run(common.read_rows(path), run_id)
        if not rows:
            continue
        first = rows[0]
        parts.append(f"## {name}\n\ndevice: {first['device']}; torch {first['torch']}, "
                     f"triton {first['triton']}, transformers {first['transformers']}; "
                     f"git sha {first['git_sha']}; run {first['run_id']}\n")
        parts.append(common.markdown_table(columns, [[r.get(c, "") for c in columns]
                                                     for r in rows]) + "\n")
        lines = targets(rows)
        if lines:
            parts.append("Targets:\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Markdown tables and target ratios of the latest run")
    common.add_results_dir(ap)
    ap.add_argument("--run-id", help="summarize this run instead of the latest (a CSV without "
                                     "it: its latest run)")
    args = ap.parse_args(argv)
    text = summarize(args.results_dir, args.run_id)
    (args.results_dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
