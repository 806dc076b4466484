"""First light: the first GPU call, one command that ends by itself inside a 10-minute call.

    BENCH_GIT_SHA=<sha> bash bench/gpu_session.sh             # on the GPU machine
    bash bench/gpu_session.sh --dry-run                         # the same script on CPU

Parts, in this order, each a subprocess with its own deadline (a part that fails or runs out
of time does not stop the next; an unused share of the budget passes on to the later parts):

1. ``env``: GPU name, driver, versions, git sha, the measured copy bandwidth and bf16 matmul
   rate (the ceilings the results are read against).
2. ``smoke``: ``pytest -m gpu_smoke``, the minimal set that compiles every kernel
   specialization of the benchmarks and checks it against the PyTorch paths.
3. ``headline``: SF-Attn at N = 16k (B=1, Hq=32, Hkv=8, D=128, G=N/4, S=4) for sinklora,
   FlexAttention, LongLoRA's algorithm and dense SDPA; H2O decode at 16k, B=8, budget 50%
   against the full caches, and the prefill; then SF-Attn at N = 32k and 8k if time is left.
4. ``tune``: a handful of tiles per SF-Attn kernel at the headline shape (``bench.tune_sf
   --quick``).
5. ``long``: N = 128k forward + backward with the exact float64 slice check, if time remains.

Everything goes to ``--out`` (default ``$OUT``, the folder a GPU run returns): ``first_light.log`` (every
part's output as it comes), ``env.json``, the result CSVs as their rows are measured, and
``summary.md``: the part table and the target ratios, also printed last. At most 8 files.

Triton's cache is ``TRITON_CACHE_DIR`` or ``build/triton-cache``: carried in with the tree after
``make warm-gpu-cache`` (``bench.warm_triton_cache``), its kernels are loaded, not compiled;
the part table counts the kernels each part compiled all the same.

``--dry-run`` runs the very same parts on CPU at toy sizes (the kernels under Triton's
interpreter, the benchmarks' PyTorch paths): ``tests/bench/test_first_light.py`` runs it, so a
typo cannot cost a GPU call.
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOTAL_S = 540
# Shares of the total budget less GRACE_S, in order; a part's deadline is the end of its
# cumulative share.
SHARES = {"env": 0.04, "smoke": 0.27, "headline": 0.44, "tune": 0.17, "long": 0.08}
# A part that would get less than this is skipped rather than started (GPU; dry run: 1 s).
MIN_START_S = {"env": 5, "smoke": 30, "headline": 60, "tune": 30, "long": 30}
# After SIGINT at a deadline, a part has this long to print what it has before it is killed.
GRACE_S = 15
OUT_FILES = ("first_light.log", "env.json", "sf_attn.csv", "h2o_decode.csv", "tune_sf.csv",
             "long_sequence.csv", "summary.md")
MAX_OUT_FILES = 8


@dataclass
class Result:
    part: str
    status: str = "skipped"
    seconds: float = 0.0
    compiles: int | None = None
    detail: list = field(default_factory=list)


class Log:
    """Echoes to the console and appends to ``first_light.log`` at once (a part killed at its
    deadline keeps everything it printed)."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, text=""):
        print(text, flush=True)
        self.file.write(text + "\n")


def cache_entries(cache_dir):
    """Kernels in Triton's on-disk cache (one folder per compiled kernel)."""
    path = Path(cache_dir)
    return sum(1 for p in path.iterdir() if p.is_dir()) if path.is_dir() else 0


def run_part(cmd, env, deadline, log):
    """Runs ``cmd`` in its own process group until it exits or ``deadline`` (monotonic) passes:
    then SIGINT (pytest prints what failed, the scripts keep the rows written), and SIGKILL
    ``GRACE_S`` later. Returns ``(status, output lines)``."""
    log(f"$ {' '.join(str(c) for c in cmd)}")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    lines, timed_out = [], False

    def stop(sig):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def reader():
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            log(line)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"[deadline: SIGINT, {GRACE_S} s to finish]")
        stop(signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            stop(signal.SIGKILL)
            proc.wait()
    thread.join(timeout=5)
    if timed_out:
        return "timed out", lines
    return ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), lines


# --- the parts ----------------------------------------------------------------------------------

def env_part(out):
    """Writes ``env.json`` and prints it: where and with what the call ran, and two ceilings."""
    import torch

    from bench import common

    info = {"python": sys.version.split()[0], "git_sha": common.git_sha()}
    for package in ("torch", "triton", "transformers", "peft", "accelerate", "pytest-xdist"):
        info[package] = common.version(package)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"not available ({type(exc).__name__})"
    cache_dir = os.environ.get("TRITON_CACHE_DIR", REPO / "build" / "triton-cache")
    info.update(triton_cache(Path(cache_dir)))
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        import triton.testing

        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda_runtime=torch.version.cuda)
        # Ceilings, on random data: a device-to-device copy (bytes read + written) and a bf16
        # matmul through PyTorch.
        src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                     return_mode="median")
        info["copy_tb_s"] = round(2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12, 3)
        del src, dst
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
        info["bf16_matmul_tflops"] = round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1)
    else:
        info["device"] = "cpu"
    (Path(out) / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    for key, value in info.items():
        print(f"{key}: {value}")


def triton_cache(cache_dir):
    """This Triton's cache key digest and ptxas version (both part of every kernel's key), and
    whether a carried cache (``bench.warm_triton_cache``) was made for this key."""
    from triton.runtime.cache import triton_key

    from bench.warm_triton_cache import key_digest

    info = {"triton_key_sha256": key_digest(triton_key())}
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        info["ptxas"] = get_ptxas_version(90).strip().splitlines()[-1]
    except Exception as exc:  # noqa: BLE001  informational: ptxas may be missing (CPU)
        info["ptxas"] = f"not available ({type(exc).__name__})"
    warmed = cache_dir / "WARMED.json"
    if warmed.exists():
        record = json.loads(warmed.read_text())
        info["carried_cache"] = (f"{record['kernels']} kernels warmed at {record['git_sha']}, "
                                 f"for this Triton: "
                                 f"{record['device_key_sha256'] == info['triton_key_sha256']}")
    else:
        info["carried_cache"] = "none"
    return info


def headline_steps(py, out, dry_run):
    """The headline part's commands: ``(share of what is left, argv)`` in order."""
    if dry_run:
        sf = ["--tiny", "--cpu", "--N", "64", "--hkv", "2", "--providers", "sinklora_torch",
              "sdpa_causal", "longlora_s2", "flex"]
        sf_more = ["--tiny", "--cpu", "--N", "128", "--hkv", "2", "--providers",
                   "sinklora_torch", "longlora_s2"]
        h2o = ["--tiny", "--cpu", "--N", "64", "--B", "2", "--models", "gqa", "--providers",
               "torch_h2o_50", "full_sdpa", "static_sdpa", "sdpa_prefill",
               "torch_h2o_prefill_50"]
    else:
        # FlexAttention last: its compilation is the slowest start, and a step that reaches its
        # time budget starts no new provider.
        providers = ["--providers", "sinklora_triton", "sdpa_causal", "longlora_s2", "flex"]
        sf = ["--N", "16384", "--hkv", "8", *providers]
        sf_more = ["--N", "32768", "8192", "--hkv", "8", *providers]
        h2o = ["--N", "16384", "--B", "8", "--models", "llama3-8b", "--providers",
               "sinklora_h2o_50", "full_sdpa", "static_sdpa", "sdpa_prefill",
               "sinklora_h2o_prefill_50"]
    results = ["--results-dir", out]
    return [(0.6, [py, "-m", "bench.sf_attn", *sf, *results]),
            (0.6, [py, "-m", "bench.h2o_decode", *h2o, *results]),
            (1.0, [py, "-m", "bench.sf_attn", *sf_more, *results])]


def part_commands(name, py, out, dry_run):
    """``[(share of the part's time, argv)]`` of a part (``--time-budget`` added when run)."""
    if name == "env":
        return [(1.0, [py, "-m", "bench.first_light", "--env-only", "--out", out])]
    if name == "smoke":
        workers = []
        try:
            import xdist  # noqa: F401

            workers = ["-n", "8" if not dry_run else "2"]
        except ImportError:
            pass
        return [(1.0, [py, "-m", "pytest", "-q", "-m", "gpu_smoke", "-p", "no:cacheprovider",
                       "-rfE", "--durations=5", *workers, "tests"])]
    if name == "headline":
        return headline_steps(py, out, dry_run)
    if name == "tune":
        return [(1.0, [py, "-m", "bench.tune_sf", "--smoke" if dry_run else "--quick",
                       "--results-dir", out])]
    if name == "long":
        return [(1.0, [py, "-m", "bench.long_sequence",
                       *(["--cpu"] if dry_run else ["--N", "131072"]), "--results-dir", out])]
    raise ValueError(f"unknown part {name!r}")


# Parts whose scripts take ``--time-budget`` (seconds after which no new shape or candidate
# starts): they end on their own before the hard deadline.
SOFT_BUDGET = {"headline", "tune"}


def describe(result, lines):
    """One-line results of a part for the summary table."""
    if result.part == "smoke":
        tail = [line for line in lines if " passed" in line or " failed" in line
                or " error" in line]
        return tail[-1:] or lines[-1:]
    if result.part == "tune":
        start = next((i for i, line in enumerate(lines) if line.startswith("fastest tile")), None)
        return [line.strip() for line in lines[start + 1:]] if start is not None else []
    if result.part == "long":
        return [line.strip() for line in lines if "sinklora_triton" in line][-1:]
    if result.part == "env":
        return [line for line in lines if line.split(":")[0] in (
            "device", "nvidia_smi", "torch", "triton", "carried_cache", "copy_tb_s",
            "bf16_matmul_tflops")]
    return []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                     REPO / "build" / "first-light"))
    ap.add_argument("--dry-run", action="store_true",
                    help="the same parts on CPU at toy sizes (interpreter / PyTorch paths)")
    ap.add_argument("--total", type=float, default=TOTAL_S, help="seconds for all parts")
    ap.add_argument("--parts", nargs="+", choices=list(SHARES), default=list(SHARES))
    ap.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.env_only:
        env_part(args.out)
        return 0
    if not args.dry_run and not os.environ.get("BENCH_GIT_SHA"):
        ap.error("set BENCH_GIT_SHA to the sha of the commit being run (the tree travels "
                 "without .git); --dry-run works without it")

    start = time.monotonic()
    log = Log(args.out / "first_light.log")
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cache_dir = Path(os.environ.get("TRITON_CACHE_DIR") or REPO / "build" / "triton-cache")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                  os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", BENCH_RUN_ID=run_id, TRITON_CACHE_DIR=str(cache_dir),
               TRITON_INTERPRET="1" if args.dry_run else "0")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    carried = cache_entries(cache_dir)
    log(f"first light {'(dry run) ' if args.dry_run else ''}run {run_id}, sha "
        f"{env.get('BENCH_GIT_SHA', '(from git)')}, {args.total:.0f} s; Triton cache {cache_dir}: "
        f"{carried} kernels at the start")

    py = sys.executable
    # The parts share what is left after the last one's grace period: a part killed at the
    # end of its share is gone by the total, and the summary follows at once.
    shared = max(args.total - GRACE_S, 1.0)
    results, ends, share_sum = [], {}, 0.0
    for name in SHARES:
        share_sum += SHARES[name]
        ends[name] = start + shared * share_sum
    for name in args.parts:
        result = Result(name)
        results.append(result)
        left = ends[name] - time.monotonic()
        if left < (1 if args.dry_run else MIN_START_S[name]):
            log(f"\n=== {name}: skipped, {left:.0f} s left")
            continue
        log(f"\n=== {name} (until +{ends[name] - start:.0f} s)")
        t0, before = time.monotonic(), cache_entries(cache_dir)
        statuses, all_lines = [], []
        for share, cmd in part_commands(name, py, args.out, args.dry_run):
            remaining = ends[name] - time.monotonic()
            if remaining < 1:
                statuses.append("out of time")
                break
            deadline = time.monotonic() + remaining * share
            if name in SOFT_BUDGET:
                # The script stops starting work a little before its hard deadline.
                cmd = [*cmd, "--time-budget", f"{max(1.0, 0.7 * remaining * share):.0f}"]
            status, lines = run_part(cmd, env, deadline, log)
            statuses.append(status)
            all_lines += lines
        result.seconds = time.monotonic() - t0
        result.compiles = cache_entries(cache_dir) - before
        bad = [s for s in statuses if s != "ok"]
        result.status = "ok" if not bad else ", ".join(dict.fromkeys(bad))
        result.detail = describe(result, all_lines)

    write_summary(args.out, results, log, time.monotonic() - start, carried)
    return 0 if all(r.status == "ok" for r in results) else 1


def write_summary(out, results, log, elapsed, carried):
    """The part table and the bench summary's target lines: ``summary.md`` and printed last."""
    from bench import summary as bench_summary

    lines = ["| part | status | seconds | new Triton kernels compiled |", "|---|---|---|---|"]
    for r in results:
        compiles = "" if r.compiles is None else str(r.compiles)
        lines.append(f"| {r.part} | {r.status} | {r.seconds:.0f} | {compiles} |")
    text = [f"# First light ({elapsed:.0f} s; Triton cache held {carried} kernels at the start)",
            "", *lines, ""]
    for r in results:
        if r.detail:
            text += [f"{r.part}:", *[f"    {d}" for d in r.detail], ""]
    try:
        bench = bench_summary.summarize(out)
    except Exception as exc:  # noqa: BLE001  e.g. a CSV row cut by a kill: keep the table
        bench = f"(no benchmark summary: {type(exc).__name__}: {exc})"
    targets = [line for line in bench.splitlines() if line.startswith("- ")]
    text += ["Targets:", *targets, "", bench]
    (Path(out) / "summary.md").write_text("\n".join(text) + "\n")
    stray = sorted(p.name for p in Path(out).iterdir() if p.name not in OUT_FILES)
    files = sorted(p.name for p in Path(out).iterdir())
    log("\n" + "\n".join(text[: text.index("Targets:") + len(targets) + 1]))
    log(f"files in {out}: {', '.join(files)}")
    if stray or len(files) > MAX_OUT_FILES:
        log(f"WARNING: {len(files)} files (at most {MAX_OUT_FILES} come back); "
            f"unexpected: {stray}")


if __name__ == "__main__":
    sys.exit(main())
