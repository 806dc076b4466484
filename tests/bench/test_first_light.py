"""First light (``bash bench/gpu_session.sh``, the first GPU call): its dry run end to end on
CPU through the same shell entry, the GPU command lines accepted by every script they call, and
a part past its deadline stopped without stopping the next one."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common, first_light, long_sequence
from bench import h2o_decode as h2o_bench
from bench import sf_attn as sf_bench
from bench import tune_sf

REPO = Path(__file__).resolve().parents[2]


def _summary_rows(out):
    """``{part: status}`` from the table of ``summary.md``."""
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in first_light.SHARES:
            rows[cells[0]] = cells[1]
    return rows


def test_dry_run_through_the_shell_entry(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_PY=sys.executable, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("OUT", None)
    run = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

    files = {p.name for p in out.iterdir()}
    assert files == set(first_light.OUT_FILES)
    assert len(files) <= first_light.MAX_OUT_FILES
    assert _summary_rows(out) == dict.fromkeys(first_light.SHARES, "ok")
    # The summary table comes last in the output, where a tail of the output still shows it.
    assert "| part | status |" in "\n".join(run.stdout.splitlines()[-30:])
    log = (out / "first_light.log").read_text()
    assert "gpu_smoke" in log and " passed" in log and " failed" not in log

    assert json.loads((out / "env.json").read_text())["device"] == "cpu"
    # Rows of one call, written by several processes, are one run.
    run_ids = set()
    for name in ("sf_attn.csv", "h2o_decode.csv", "tune_sf.csv", "long_sequence.csv"):
        with (out / name).open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, name
        assert not [r["error"] for r in rows if r["error"]], name
        run_ids |= {r["run_id"] for r in rows}
    assert len(run_ids) == 1
    with (out / "sf_attn.csv").open(newline="") as f:
        assert {r["N"] for r in csv.DictReader(f)} == {"64", "128"}  # both SF-Attn steps ran


def _gpu_argv(part, out):
    """``(module, argv after it)`` of each command of ``part`` on the GPU, as run."""
    argvs = []
    for _share, cmd in first_light.part_commands(part, "python3", out, dry_run=False):
        assert cmd[1] == "-m", cmd
        argv = [str(c) for c in cmd[3:]]
        if part in first_light.SOFT_BUDGET:
            argv += ["--time-budget", "100"]
        argvs.append((cmd[2], argv))
    return argvs


def test_gpu_command_lines_give_the_headline_shapes(tmp_path, monkeypatch):
    """What the dry run cannot run, the GPU command lines, goes through the scripts' own
    parsing and shape selection as on a CUDA device, with the benchmark runs stubbed."""
    calls = []
    monkeypatch.setattr(common, "start", lambda args: (torch.device("cuda"), {}))
    monkeypatch.setattr(sf_bench, "run", lambda *a: calls.append(("sf_attn", a[4], a[5])))
    monkeypatch.setattr(h2o_bench, "run", lambda *a: calls.append(("h2o", a[4], a[5])))
    monkeypatch.setattr(long_sequence, "run_case",
                        lambda case, device, row: calls.append(("long", case))
                        or dict(row, error="not run"))
    mains = {"bench.sf_attn": sf_bench.main, "bench.h2o_decode": h2o_bench.main,
             "bench.tune_sf": tune_sf.main, "bench.long_sequence": long_sequence.main}
    for part in ("headline", "tune", "long"):
        for script, argv in _gpu_argv(part, tmp_path):
            mains[script](argv)  # bench.tune_sf parses, then says it needs a GPU

    sf_calls = [c for c in calls if c[0] == "sf_attn"]
    assert [[(s.B, s.Hq, s.Hkv, s.N, s.D, s.G, s.S, s.dtype) for s in shapes]
            for _, shapes, _ in sf_calls] == [
        [(1, 32, 8, 16384, 128, 4096, 4, torch.bfloat16)],
        [(1, 32, 8, n, 128, n // 4, 4, torch.bfloat16) for n in (32768, 8192)]]
    assert all(providers[0] == "sinklora_triton" and {"flex", "longlora_s2", "sdpa_causal"}
               <= set(providers) for _, _, providers in sf_calls)
    (_, h2o_shapes, h2o_providers), = [c for c in calls if c[0] == "h2o"]
    assert [(s.B, s.Hq, s.Hkv, s.N, s.D, s.dtype) for s in h2o_shapes] == [
        (8, 32, 8, 16384, 128, torch.bfloat16)]
    assert {"sinklora_h2o_50", "full_sdpa", "static_sdpa", "sdpa_prefill",
            "sinklora_h2o_prefill_50"} == set(h2o_providers)
    assert [c[1].N for c in calls if c[0] == "long"] == [131072]


def test_quick_tune_starts_with_todays_tiles():
    from sinklora.kernels import sf_attn as launchers

    today = launchers._TILES[("16bit", 128)]
    for kernel, tile in zip(tune_sf.KERNELS, today):
        assert tune_sf.QUICK[kernel][0] == tuple(tile), kernel
        assert len(set(tune_sf.QUICK[kernel])) == len(tune_sf.QUICK[kernel]) >= 3


def test_a_part_past_its_deadline_is_stopped_and_the_next_part_runs(tmp_path, monkeypatch):
    # Of 60 s, 45 are shared (15 are the grace period): smoke gets until 4 s (its collection
    # alone takes longer), tune the 36 s after it (its --smoke run takes about 10).
    monkeypatch.setitem(first_light.SHARES, "smoke", 0.05)
    monkeypatch.setitem(first_light.SHARES, "headline", 0.0)
    monkeypatch.setitem(first_light.SHARES, "tune", 0.8)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = first_light.main(["--dry-run", "--out", str(out), "--total", "60",
                             "--parts", "smoke", "tune"])
    assert code == 1
    status = _summary_rows(out)
    assert status["smoke"] == "timed out"
    assert status["tune"] == "ok"
    log = (out / "first_light.log").read_text()
    assert "[deadline: SIGINT" in log and "bench.tune_sf --smoke" in log


@pytest.mark.parametrize("dry_run", [True, False])
def test_deadlines_fit_the_call(dry_run):
    ends = 0.0
    for part, share in first_light.SHARES.items():
        ends += share
        commands = first_light.part_commands(part, "python3", Path("out"), dry_run)
        assert commands and all(0 < s <= 1 for s, _ in commands)
        assert commands[-1][0] == 1.0, part  # the last command of a part may use all it has
    assert ends == pytest.approx(1.0)
    # The last part's deadline plus its grace period is the total, inside a 600 s command.
    assert first_light.TOTAL_S <= 540


def test_summary_states_the_prefill_target():
    from bench import summary

    def row(provider, ms):
        return {"provider": provider, "pass": "prefill", "B": "8", "Hq": "32", "Hkv": "8",
                "N": "16384", "ms_p50": str(ms), "error": ""}

    lines = summary.h2o_targets([row("sinklora_h2o_prefill_50", 1.2), row("sdpa_prefill", 1.0)])
    assert lines == ["- B=8 Hq=32 Hkv=8 N=16384: H2O prefill / causal SDPA prefill time: 1.200 "
                     "(target <= 1.3): met"]


def test_warmed_cache_is_loaded_instead_of_compiled(tmp_path):
    """The warming mechanism with this machine's own Triton key: a second process making the
    same launches loads every kernel from the cache and compiles none."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "bench.warm_triton_cache", "--cache-dir", str(cache),
           "--parts", "check", "--key", "local"]
    outputs = []
    for _ in range(2):
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        outputs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    first, second = outputs
    assert first["compiled"] >= 6 and first["loaded"] == 0  # SF-Attn 4 kernels, H2O decode 2
    assert second == dict(first, compiled=0, loaded=first["compiled"], seconds=second["seconds"])
    assert json.loads((cache / "WARMED.json").read_text()) == second

    from triton.runtime.cache import triton_key

    from bench import warm_triton_cache

    assert first["device_key_sha256"] == warm_triton_cache.key_digest(triton_key())
    info = first_light.triton_cache(cache)
    assert info["carried_cache"].endswith("for this Triton: True")
