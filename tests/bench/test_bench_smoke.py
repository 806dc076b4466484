"""The benchmark harness on CPU: exact FLOP counting, the LongLoRA provider, and a tiny
``bench.run_all --cpu`` run whose CSV rows carry every column, and the default results folder
that keeps a clone clean."""
import argparse
import csv
from pathlib import Path

import pytest
import torch

import sinklora
from bench import common, context_extension, h2o_quality, long_sequence, plot, run_all
from bench import h2o_decode as h2o_bench
from bench import sf_attn as sf_bench
from bench import summary, tune_sf
from sinklora.sf_attn import dense_mask, sf_attention_reference

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n, hq, make_pattern", [
    (96, 4, sf_bench.sf_pattern),       # N a multiple of G
    (100, 3, sf_bench.sf_pattern),      # last groups cut short, odd head count
    (96, 4, sf_bench.s2_pattern),       # the wrap-around of "s2"
    (72, 3, sf_bench.s2_pattern),
    (90, 2, sf_bench.causal_pattern),   # one group: full causal
])
def test_visible_pairs_equal_the_dense_mask(n, hq, make_pattern):
    shape = sf_bench.Shape(2, hq, 1, n, 8, (n // 4) & ~1, 4, torch.float32)
    pattern = make_pattern(shape)
    visible = int(dense_mask(n, hq, **pattern).sum())
    assert sf_bench.visible_pairs(shape, pattern) == shape.B * visible


@pytest.mark.parametrize("hq, hkv, n, g", [(4, 4, 64, 16), (6, 2, 48, 12), (3, 1, 40, 8)])
def test_longlora_provider_equals_s2_reference(hq, hkv, n, g):
    q = torch.randn(2, hq, n, 16, dtype=torch.float64)
    k = torch.randn(2, hkv, n, 16, dtype=torch.float64)
    v = torch.randn(2, hkv, n, 16, dtype=torch.float64)
    shape = sf_bench.Shape(2, hq, hkv, n, 16, g, 4, torch.float64)
    ref = sf_attention_reference(q, k, v, **sf_bench.s2_pattern(shape))
    assert common.rel_err(sf_bench.longlora_s2(q, k, v, g), ref) < 1e-12


def test_gate_rejects_a_wrong_output():
    ref = torch.randn(64)
    assert common.gate("x", [ref + 1e-5 * torch.randn(64)], [ref], torch.float32) < 1e-3
    with pytest.raises(common.GateError, match="rel. error"):
        common.gate("x", [ref.flip(0)], [ref], torch.float32)
    with pytest.raises(common.GateError):
        common.gate("x", [torch.full_like(ref, float("nan"))], [ref], torch.float32)


def test_sdpa_choice_names_the_dispatchers_backend(monkeypatch):
    from torch.nn.attention import SDPBackend

    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    assert common.sdpa_choice(q, k, k, is_causal=True, enable_gqa=True) in SDPBackend.__members__
    monkeypatch.delattr(torch, "_fused_sdp_choice")
    assert common.sdpa_choice(q, k, k) == "not reported by this torch"


def test_h2o_prefill_gate_checks_the_scores_and_the_kept_set():
    shape = h2o_bench.Shape("gqa", 2, 4, 2, 64, 16, torch.float32)
    ctx = h2o_bench.Context(shape, torch.device("cpu"))
    check = h2o_bench.make_h2o_prefill(0.5, "torch")(ctx).gate
    assert "its kept set the top scores" in check()
    heavy, recent = h2o_bench.split_budget(shape, 0.5)
    _, state = sinklora.h2o_prefill(ctx.q_prompt, ctx.k_prompt, ctx.v_prompt,
                                    heavy_budget=heavy, recent_budget=recent, backend="torch")
    assert h2o_bench._check_kept(ctx, state, recent) < 1e-6
    last = state.positions[1, 1]
    older = last < shape.N - recent
    # Another (sequence, kv head)'s scores, a kept heavy hitter swapped for the best evicted
    # token, a recent token swapped for an older one: each is caught.
    swapped = h2o_bench.clone_state(state)
    swapped.score_buffer[1, 1] = state.scores[0, 0]
    with pytest.raises(common.GateError, match="scores of the kept entries"):
        h2o_bench._check_kept(ctx, swapped, recent)
    every = sinklora.h2o_prefill(ctx.q_prompt, ctx.k_prompt, ctx.v_prompt,
                                 heavy_budget=shape.N, recent_budget=0, backend="torch")[1]
    left = sorted(set(range(shape.N - recent)) - set(last.tolist()))
    ref = every.scores[1, 1][every.positions[1, 1].argsort()]
    best_left = max(left, key=lambda p: ref[p].item())
    worst_kept = min(last[older].tolist(), key=lambda p: ref[p].item())
    for wrong, match in ((worst_kept, "kept a token of score"), (last.max().item(), "recent")):
        tampered = h2o_bench.clone_state(state)
        slot = (last == wrong).nonzero().item()
        tampered.position_buffer[1, 1, slot] = best_left
        tampered.score_buffer[1, 1, slot] = ref[best_left]
        with pytest.raises(common.GateError, match=match):
            h2o_bench._check_kept(ctx, tampered, recent)
    twice = h2o_bench.clone_state(state)
    slot, other = (last == worst_kept).nonzero().item(), (last != worst_kept).nonzero()[0].item()
    twice.position_buffer[1, 1, slot] = last[other]
    twice.score_buffer[1, 1, slot] = state.scores[1, 1, other]
    with pytest.raises(common.GateError, match="stored twice"):
        h2o_bench._check_kept(ctx, twice, recent)


def test_cpu_run_writes_complete_rows(tmp_path, capsys):
    # In-process (the same code `make bench` runs) to spare a second import of torch and
    # transformers; CPU timings are quick here because only the harness is under test.
    assert run_all.main(["--cpu", "--tiny", "--results-dir", str(tmp_path)]) == 0
    assert "Triton timings need a GPU" in capsys.readouterr().out

    with (tmp_path / "sf_attn.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.COLUMNS
        rows = list(reader)
    assert {r["provider"] for r in rows} == {"sinklora_torch", "flex", "longlora_s2",
                                             "sdpa_causal"}
    assert {(r["N"], r["Hkv"]) for r in rows} == {("64", "4"), ("64", "2")}
    for r in rows:
        assert r["error"] == "", r
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["peak_mem_mb"] == ""
        for c in ("torch", "triton", "transformers", "git_sha", "timestamp", "run_id"):
            assert r[c], c
        p20, p50, p80 = float(r["ms_p20"]), float(r["ms_p50"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert float(r["tflops"]) > 0
        assert "gate rel.err" in r["note"] or r["provider"] == "sinklora_torch"
    passes = {r["pass"] for r in rows if r["provider"] == "longlora_s2"}
    assert passes == {"fwd", "bwd", "fwd+bwd"}
    assert (tmp_path / "sf_attn.png").stat().st_size > 0
    assert "## sf_attn" in (tmp_path / "summary.md").read_text()


def test_a_failing_provider_gets_error_rows_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("compile failed\nsecond line")

    monkeypatch.setitem(sf_bench.PROVIDERS, "broken", broken)
    device = torch.device("cpu")
    env = common.environment(device)
    shape = sf_bench.shapes(device, tiny=True)[:1]
    rows = sf_bench.run(device, tmp_path / "sf.csv", env, common.Deadline(None), shape,
                        ["broken", "longlora_s2"])
    assert [(r["provider"], r["pass"]) for r in rows] == [
        (p, s) for p in ("broken", "longlora_s2") for s in sf_bench.PASSES]
    assert all(r["error"] == "RuntimeError: compile failed" for r in rows[:3])
    assert all(not r.get("error") and r["ms_p50"] > 0 for r in rows[3:])
    assert len(common.read_rows(tmp_path / "sf.csv")) == 6


def test_tile_tuning_runs_each_kernel_and_restores_the_tiles(tmp_path, capsys):
    from sinklora.kernels import sf_attn as launchers

    default_tiles = launchers.tiles
    assert tune_sf.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    assert launchers.tiles is default_tiles
    rows = common.read_rows(tmp_path / "tune_sf.csv")
    assert [r["provider"].split(":")[0] for r in rows] == list(tune_sf.KERNELS)
    assert [r["pass"] for r in rows] == ["fwd", "bwd", "bwd"]
    for r in rows:
        assert r["error"] == "" and float(r["ms_p50"]) > 0, r
    assert "fastest tile per kernel" in capsys.readouterr().out


def test_host_time_is_per_call_between_two_synchronizations(monkeypatch):
    events = []
    monkeypatch.setattr(common, "synchronize", lambda device: events.append("sync"))
    assert common.host_ms_per_call(lambda: events.append("call"), torch.device("cpu")) is None
    assert events == []
    ms = common.host_ms_per_call(lambda: events.append("call"), torch.device("cuda"), calls=7)
    assert events == ["sync"] + ["call"] * 7 + ["sync"]
    assert 0 < ms < 1e3


def _gpu_row(provider, n, ms, run_id, **extra):
    return {**{c: "" for c in common.COLUMNS}, "kernel": "sf_attn", "provider": provider,
            "pass": "fwd+bwd", "B": "1", "Hq": "32", "Hkv": "8", "N": str(n), "D": "128",
            "dtype": "bfloat16", "ms_p50": str(ms), "device": "NVIDIA H100 80GB HBM3",
            "run_id": run_id, **extra}


def test_summary_forms_each_target_and_never_drops_one(tmp_path):
    """Ratios from one run's rows (an older run is ignored); a provider that failed or has no
    row gives a "not measured" line instead of a missing one."""
    old, new = "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"
    rows = [_gpu_row("flex", 16384, 1.0, old),
            _gpu_row("sinklora_triton", 16384, 10.0, new, tflops="300", peak_mem_mb="100"),
            _gpu_row("flex", 16384, 16.0, new),
            _gpu_row("sdpa_causal", 16384, 29.0, new, tflops="400"),
            _gpu_row("longlora_s2", 16384, "", new, error="OutOfMemoryError: x")]
    common.write_csv(tmp_path / "sf_attn.csv", rows)
    lines = summary.sf_targets(common.latest_run(common.read_rows(tmp_path / "sf_attn.csv")))
    assert lines == [
        "- Hkv=8 N=16384: FlexAttention / sinklora fwd+bwd time: 1.600 (target >= 1.5): met",
        "- Hkv=8 N=16384: dense causal SDPA / sinklora fwd+bwd time: 2.900 (target >= 3.0): "
        "MISSED",
        "- Hkv=8 N=16384: sinklora / SDPA useful TFLOP/s: 0.750 (target >= 0.7): met",
        "- Hkv=8 N=16384: LongLoRA / sinklora fwd+bwd time: not measured: longlora_s2 "
        "(OutOfMemoryError: x): target not checked",
        "- Hkv=8 N=16384: sinklora / LongLoRA peak memory: not measured: longlora_s2 "
        "(OutOfMemoryError: x): target not checked"]
    # A summary of another CSV's run keeps this CSV's own latest run (run_all --only).
    text = summary.summarize(tmp_path, run_id="2026-03-01T00:00:00+00:00")
    assert f"run {new}" in text and "FlexAttention / sinklora" in text


def test_peak_memory_counts_only_what_the_call_adds(monkeypatch):
    stats = {"allocated": 700 * 2**20, "peak": 0}
    monkeypatch.setattr(common, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device: stats.update(peak=stats["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: stats["peak"])

    def call():  # allocates 64 MiB of working memory on top of the 700 MiB already held
        stats["peak"] = stats["allocated"] + 64 * 2**20

    assert common.peak_memory_mb(call, torch.device("cuda")) == 64
    assert common.peak_memory_mb(call, torch.device("cpu")) is None


def test_summary_longlora_and_h2o_targets():
    run = "2026-02-01T00:00:00+00:00"
    rows = [_gpu_row("sinklora_triton", 8192, 10.0, run, peak_mem_mb="100"),
            _gpu_row("longlora_s2", 8192, 14.0, run, peak_mem_mb="100")]
    assert [line for line in summary.sf_targets(rows) if "LongLoRA" in line] == [
        "- Hkv=8 N=8192: LongLoRA / sinklora fwd+bwd time: 1.400 (target >= 2.0): MISSED",
        "- Hkv=8 N=8192: sinklora / LongLoRA peak memory: 1.000 (target < 1.0): MISSED"]

    def decode(provider, ms, **extra):
        return _gpu_row(provider, 16384, ms, run, **{"pass": "decode", "B": "8", **extra})

    budget = dict(budget="8192", kv_bytes=str(2 * 8 * 8 * 8192 * 128 * 2))
    lines = summary.h2o_targets([decode("sinklora_h2o_50", 0.7, **budget),
                                 decode("full_sdpa", 1.0)])
    where = "B=8 Hq=32 Hkv=8 N=16384"
    assert lines == [
        f"- {where}: sinklora H2O 50% / full-cache SDPA step time: 0.700 (target <= 0.6): MISSED",
        f"- {where}: stored KV bytes {budget['kv_bytes']} vs the budget's {budget['kv_bytes']} "
        "(K and V): met"]
    lines = summary.h2o_targets([decode("sinklora_h2o_50", 0.5, **budget),
                                 decode("full_sdpa", "", error="OutOfMemoryError: y")])
    assert lines[0] == (f"- {where}: H2O 50% vs full cache: not measured: full_sdpa "
                        "(OutOfMemoryError: y): target not checked")


def test_flops_per_pass():
    shape = sf_bench.Shape(1, 4, 2, 64, 16, 16, 4, torch.float32)
    pattern = sf_bench.sf_pattern(shape)
    fwd = sf_bench.flops(shape, pattern, "fwd")
    assert fwd == 4 * 16 * sf_bench.visible_pairs(shape, pattern)
    assert sf_bench.flops(shape, pattern, "bwd") == 2.5 * fwd
    assert sf_bench.flops(shape, pattern, "fwd+bwd") == 3.5 * fwd


class _Parsed(Exception):
    pass


def test_every_script_writes_under_build_by_default(monkeypatch):
    """`make bench` and each script with no --results-dir write under build/bench, which git
    ignores, so a clone stays clean; bench/results changes only when it is named."""
    assert common.RESULTS_DIR == REPO / "build" / "bench"
    assert "build/" in (REPO / ".gitignore").read_text().split()
    parse = argparse.ArgumentParser.parse_args
    parsed = []

    def stop_after_parsing(self, args=None, namespace=None):
        parsed.append(parse(self, args, namespace))
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
    scripts = (run_all, sf_bench, h2o_bench, long_sequence, tune_sf, plot, summary,
               h2o_quality, context_extension)
    for script in scripts:
        with pytest.raises(_Parsed):
            script.main([])
    assert [args.results_dir for args in parsed] == [common.RESULTS_DIR] * len(scripts)
