"""Shared pieces of the benchmarks: the ``Provider`` type and the one run loop over shapes x
providers, timing, peak memory, correctness gates, the environment record, the CSV writer and
reader, the Markdown table and the deadline.

Every benchmark appends one row per (provider, pass, shape) to ``<results dir>/<question>.csv``
with the columns in ``COLUMNS``; a provider that fails (out of memory, a compile error, a
failed correctness gate) gets a row with ``error`` filled in instead of stopping the run. The
results folder is ``build/bench`` (ignored by git) unless ``--results-dir`` names another:
``bench/results`` holds the committed runs and changes only when it is named.
"""
import argparse
import csv
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Triton reads this when sinklora's kernels are defined, so it is set before the scripts import
# sinklora: timings must never come from the interpreter, so on CUDA it is off; without CUDA
# the kernels can only run interpreted (bench/long_sequence.py's CPU check).
if torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sinklora.testing import rel_err  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "build" / "bench"

COLUMNS = [
    "kernel", "provider", "pass", "B", "Hq", "Hkv", "N", "D", "G", "S", "budget", "dtype",
    "ms_p20", "ms_p50", "ms_p80", "tflops", "gb_s", "kv_bytes", "peak_mem_mb",
    "device", "torch", "triton", "transformers", "git_sha", "timestamp", "run_id",
    "note", "error",
]
QUANTILES = (0.2, 0.5, 0.8)
# Relative L2 error allowed between a provider and sinklora's own output, by dtype: bf16 keeps
# 8 mantissa bits, and the providers sum in different orders.
GATE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


class GateError(RuntimeError):
    """A provider's output disagrees with sinklora's: its timings would be meaningless."""


@dataclass
class Provider:
    """One way of computing a benchmark's step, as a provider factory returns it.

    ``fn`` is what is timed and ``note`` says how it runs. Its work is ``pattern`` (SF-Attn: the
    ``sf_attention`` arguments whose visible pairs count) or ``budget`` (H2O: the entries kept
    per sequence and kv head; None for a full cache). ``gate()`` checks its output before it is
    timed and returns the note's gate part (None where the benchmark gates every provider the
    same way); ``kv_bytes()`` is what a decode step leaves stored in the layer.
    """

    fn: Callable
    note: str = ""
    gate: Callable | None = None
    pattern: dict | None = None
    budget: int | None = None
    kv_bytes: Callable | None = None


def git_sha():
    """``HEAD``'s sha, with ``-dirty`` when tracked files differ from it.

    ``BENCH_GIT_SHA`` overrides it, for copies of the tree that travel without ``.git``.
    """
    if os.environ.get("BENCH_GIT_SHA"):
        return os.environ["BENCH_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def version(package):
    """The installed version of ``package``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device, **extra):
    """The record of where and with what a run happened (the same for all its rows), with
    ``extra`` entries (the paper experiments' corpus).

    ``BENCH_RUN_ID`` names the run instead of the start time, so that several scripts of one
    GPU run (``bench/first_light.py``) form one run for the plots and the summary."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "run_id": os.environ.get("BENCH_RUN_ID") or timestamp(),
        **extra,
    }


def describe(env):
    """The environment as the lines a run prints first and a result file starts with
    (RESULTS.md quotes them)."""
    corpus = f", corpus {env['corpus']}" if "corpus" in env else ""
    return [f"device: {env['device']}",
            f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
            f"Python {env['python']}",
            f"git sha {env['git_sha']}{corpus}, run {env['run_id']}"]


def add_results_dir(ap):
    """``--results-dir``, the same default in every script: nothing tracked is written unless
    it is named."""
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                    help="where the results go (default build/bench; bench/results holds the "
                         "committed runs)")


def script_parser(doc, full_help):
    """The options every benchmark script and ``run_all`` share."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--full", action="store_true", help=full_help)
    ap.add_argument("--cpu", action="store_true", help="the CPU mode even where CUDA exists")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU shapes (the smoke test)")
    add_results_dir(ap)
    ap.add_argument("--time-budget", type=float, help="seconds after which no new shape starts")
    return ap


def start(args):
    """``(device, environment)`` for a run with the parsed shared options; prints the
    environment lines."""
    if args.tiny:
        quick_cpu_timing()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    env = environment(device)
    print("\n".join(describe(env)), flush=True)
    return device, env


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Calls per CPU timing: at least ``min_reps``, more until ``min_seconds`` pass, at most
# ``max_reps``.
# The smoke test lowers them (``quick_cpu_timing``): it checks the harness, not the numbers.
CPU_TIMING = {"min_reps": 3, "max_reps": 20, "min_seconds": 0.1}


def quick_cpu_timing():
    """The fewest CPU calls that still give three distinct quantiles."""
    CPU_TIMING.update(min_reps=3, max_reps=3, min_seconds=0.0)


def _cpu_quantiles(fn, grad_to_none):
    # No event timers on CPU: wall clock around each call, after one warm-up call.
    fn()
    times, start = [], time.perf_counter()
    while len(times) < CPU_TIMING["max_reps"] and (
            len(times) < CPU_TIMING["min_reps"]
            or time.perf_counter() - start < CPU_TIMING["min_seconds"]):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return [deciles[int(q * 10) - 1] for q in QUANTILES]


def quantile_columns(ms):
    """The row's timing columns from ``time_ms``'s ``[p20, p50, p80]``."""
    return dict(zip(("ms_p20", "ms_p50", "ms_p80"), ms))


def time_ms(fn, device, grad_to_none=None):
    """``[p20, p50, p80]`` milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (event
    timers, L2 flushed between calls), a wall-clock loop on CPU."""
    if device.type != "cuda":
        return _cpu_quantiles(fn, grad_to_none)
    import triton.testing

    return list(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                        quantiles=list(QUANTILES)))


def host_ms_per_call(fn, device, calls=50):
    """Host (CPU) milliseconds per call of ``fn`` issued back to back without synchronizing:
    what a call costs the CPU, which bounds the step rate whenever the GPU's share is shorter
    (decoding at batch 1). ``None`` on CPU, where every call runs to completion. 50 calls stay
    far inside CUDA's launch queue, so the host never waits for the GPU unless ``fn`` itself
    synchronizes."""
    if device.type != "cuda":
        return None
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed * 1e3 / calls


def peak_memory_mb(fn, device):
    """Peak CUDA memory (MiB) one ``fn()`` allocates on top of what was held before it: its
    outputs and working memory, not the inputs nor what the benchmark keeps (references,
    other providers' leftovers), so providers compare fairly. ``None`` on CPU, where torch
    keeps no such counter."""
    if device.type != "cuda":
        return None
    synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - held) / 2**20


def gate(name, outs, refs, dtype):
    """Raises ``GateError`` unless every tensor in ``outs`` matches ``refs`` within the dtype's
    tolerance; returns the largest relative error."""
    tol = GATE_TOLERANCE[dtype]
    worst = 0.0
    for label, out, ref in zip(("out", "dq", "dk", "dv"), outs, refs):
        err = rel_err(out, ref)
        if not err <= tol:  # NaN fails too
            raise GateError(f"{name}: {label} differs from sinklora's by rel. error {err:.2e} "
                            f"(tolerance {tol:.0e})")
        worst = max(worst, err)
    return worst


def sdpa_choice(query, key, value, **kwargs):
    """For a note: the backend SDPA's dispatcher picks for these arguments (keywords as
    ``scaled_dot_product_attention``'s), from torch's private ``_fused_sdp_choice``."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(query, key, value, **kwargs)).name
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return "not reported by this torch"


def free_memory(device, after_failure=False):
    """Returns cached CUDA blocks so the next provider starts from the same state. After a
    failure the exception's traceback held the failed call's tensors in reference cycles, so
    those are collected first (a full collection costs about half a second: not every time)."""
    if after_failure:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short_error(exc):
    """One line for the CSV: the exception type and the first line of its message."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def report_failure(label, exc):
    """Prints a failed provider's traceback tail (the CSV keeps only one line of it)."""
    tail = "".join(traceback.format_exception(exc)[-3:])
    print(f"  FAILED {label}: {short_error(exc)}\n{tail}", flush=True)


def failed(row, label, exc):
    """``row`` as the error row of a failure ``exc`` of ``label``, whose traceback is printed."""
    report_failure(label, exc)
    return dict(row, error=short_error(exc), timestamp=timestamp())


def write_csv(path, rows, columns=COLUMNS, append=True, float_format="{:.4g}".format):
    """Writes ``rows`` (dicts; keys outside ``columns`` are left out) to the CSV at ``path``:
    appended, with the header when the file is new (``ValueError`` if an existing file has
    other columns), or replacing the file (``append=False``). Floats go through
    ``float_format``, None becomes an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not append or not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(columns):
            raise ValueError(f"{path} has columns {header}, expected {columns}; move it aside")

    def cell(value):
        if value is None:
            return ""
        return float_format(value) if isinstance(value, float) else value

    with path.open("w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({c: cell(row.get(c)) for c in columns})


def result_csvs(results_dir):
    """The CSVs in ``results_dir`` written by these scripts (others may share the folder)."""
    paths = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        with path.open(newline="") as f:
            if next(csv.reader(f), None) == COLUMNS:
                paths.append(path)
    return paths


def read_rows(path):
    """The rows of a results CSV as dicts of strings."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows, run_id=None):
    """The rows of ``run_id`` when ``rows`` hold that run, else of the newest run in ``rows``
    (run ids are ISO timestamps)."""
    if not rows:
        return []
    if not any(r["run_id"] == run_id for r in rows):
        run_id = max(r["run_id"] for r in rows)
    return [r for r in rows if r["run_id"] == run_id]


def is_timed(row):
    """Whether a row read back carries a timing (error rows have none)."""
    return bool(row["ms_p50"]) and not row["error"]


def markdown_table(header, rows):
    """A Markdown table: the ``header`` cells, then ``rows`` (sequences of cells; a ``|`` in a
    cell becomes ``/``)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def timestamp():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Deadline:
    """Wall-clock budget of a script or a stage of one, so that a GPU run fits in its
    10 minutes: once it has passed no new shape, provider or run starts. ``None``: no limit."""

    def __init__(self, seconds):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self):
        return self.end is not None and time.monotonic() > self.end


def print_row(row):
    """One console line per CSV row, for the log of a run."""
    if row.get("error"):
        tail = f"ERROR {row['error']}"
    else:
        rate = (f"{row['tflops']:.3g} TFLOP/s" if row.get("tflops") is not None
                else f"{row['gb_s']:.3g} GB/s" if row.get("gb_s") is not None else "")
        mem = f" peak {row['peak_mem_mb']:.0f} MiB" if row.get("peak_mem_mb") is not None else ""
        tail = f"{row['ms_p50']:9.3f} ms  {rate}{mem}"
    note = f"  [{row['note']}]" if row.get("note") else ""
    print(f"  {row['provider']:<16} {row['pass']:<8} {tail}{note}", flush=True)


def run(kernel, device, csv_path, env, deadline, shapes, names, prepare, bench):
    """The benchmarks' one loop: for each shape (its ``columns()`` go into the rows)
    ``prepare(shape)`` makes the inputs once, then ``bench(name, inputs, base_row)`` returns
    the rows of each provider in ``names``, printed and appended to ``csv_path`` as they come.
    A shape or provider that would start after ``deadline`` is skipped. Returns the rows
    written."""
    written = []
    for shape in shapes:
        if deadline.passed():
            print(f"{kernel}: time budget used up, skipping {shape}", flush=True)
            continue
        print(f"{kernel} {shape}", flush=True)
        try:
            inputs = prepare(shape)
        except Exception as exc:  # noqa: BLE001  an OOM on one shape must not hide the others
            report_failure(f"inputs for {shape}", exc)
            free_memory(device, after_failure=True)
            continue
        base = dict(env, kernel=kernel, **shape.columns())
        for name in names:
            if deadline.passed():
                print(f"  time budget used up, skipping {name}", flush=True)
                continue
            rows = bench(name, inputs, base)
            for row in rows:
                print_row(row)
            write_csv(csv_path, rows)
            written += rows
            free_memory(device, after_failure=any(row.get("error") for row in rows))
        del inputs
        free_memory(device)
    return written
