"""Fills a Triton cache for first light's GPU call on a machine without a GPU, so that the call
loads its kernels instead of compiling them on the device's clock.

    make warm-gpu-cache          # build/warm-venv with triton 3.6.0, then this module
    # the GPU run then takes build/triton-cache along (bench/RESULTS.md, "The GPU calls")

The launches first light makes (the ``gpu_smoke`` tests, the headline shapes, the quick tile
sweep, N = 128k) are made here on CPU tensors of the same shapes, strides and dtypes, through
Triton's own JIT with a stand-in sm_90 driver: each launch is specialized and compiled as on
the GPU (``warmup``: nothing runs, outputs are left as allocated, so the tests' assertions fail
and are ignored). Only the binaries are stored (``TRITON_STORE_BINARY_ONLY``), under the keys
the GPU machine computes.

A Triton cache key covers Triton itself (its Python sources and ``libtriton.so``), the kernel
source, the specialization, the options, ptxas's version and the target. The GPU machine runs
triton 3.6.0 under Python 3.12, whose ``libtriton.so`` differs from this machine's build: its
sha256 (``DEVICE_LIBTRITON``, from PyPI's cp312 manylinux wheel, every other file of which
equals the cp311 wheel's) replaces the local one in the key. ``WARMED.json`` in the cache
records the key it assumed; first light's ``env`` part prints whether the device's own key is
the same, and each part's count of newly compiled kernels shows what was not hit.
"""
import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# sha256 of triton/_C/libtriton.so in triton-<version>-cp312-cp312-manylinux_2_27_x86_64
# .manylinux_2_28_x86_64.whl on PyPI: the GPU machine's Triton.
DEVICE_LIBTRITON = {"3.6.0": "28daaa70a904e4f8add754e518533e8a69b94ab8b16431ce77d45f1f25282b87"}
H200_SMS = 132


def libtriton_sha256():
    import triton

    path = Path(triton.__file__).parent / "_C" / "libtriton.so"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def key_digest(key):
    """What ``WARMED.json`` and first light's ``env`` part compare: sha256 of the Triton key."""
    return hashlib.sha256(key.encode()).hexdigest()


class StandInDriver:
    """Enough of Triton's CUDA driver for the JIT to specialize and compile for sm_90."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(device_key):
    """Triton's JIT compiles every launch for sm_90 under ``device_key`` and runs nothing;
    sinklora's host code takes the Triton path on CPU tensors as it would on CUDA ones."""
    import torch
    import triton.runtime.cache as triton_cache
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import sinklora.h2o.ops
    import sinklora.hf.cache
    import sinklora.sf_attn.api
    from sinklora.kernels import h2o_decode

    saved = [(triton_cache, "triton_key"), (JITFunction, "run"),
             (h2o_decode, "_num_splits"), (h2o_decode, "_sm_count")]
    backend_users = [sinklora.sf_attn.api, sinklora.h2o.ops, sinklora.hf.cache]
    saved += [(m, "resolve_backend") for m in backend_users]
    originals = [(obj, name, getattr(obj, name)) for obj, name in saved]
    run, num_splits = JITFunction.run, h2o_decode._num_splits

    def warm(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    triton_cache.triton_key = lambda: device_key
    JITFunction.run = warm
    h2o_decode._sm_count = lambda index: H200_SMS
    h2o_decode._num_splits = lambda device, programs, length: num_splits(
        torch.device("cuda", 0), programs, length)
    for module in backend_users:
        module.resolve_backend = lambda backend, tensor, name: (
            "torch" if backend == "torch" else "triton")
    driver.set_active(StandInDriver())
    try:
        yield
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)
        driver._active = None  # the next use finds the real driver again


# --- first light's launches ---------------------------------------------------------------------

def smoke():
    """The ``gpu_smoke`` tests at their compiled sizes (CPU tensors, so ``DEVICE`` is cpu)."""
    import pytest

    # Their assertions fail on the uncomputed outputs: only the launches matter here.
    pytest.main(["-q", "-m", "gpu_smoke", "-p", "no:cacheprovider", "-p", "no:warnings",
                 "--tb=no", "--no-summary", str(REPO / "tests")])


def headline():
    """SF-Attn at the headline shapes with each pattern a provider or gate computes on the
    kernels; H2O prefill and decode at 16k, B=8, Llama-3-8B heads, 50% budget."""
    import torch

    import sinklora
    from bench import h2o_decode as h2o_bench
    from bench import sf_attn as sf_bench

    cpu = torch.device("cpu")
    for shape in sf_bench.shapes(torch.device("cuda"), n_values=(16384, 32768, 8192),
                                 hkv_values=(8,)):
        q, k, v, do = sf_bench.make_inputs(shape, cpu)
        for pattern in (sf_bench.sf_pattern, sf_bench.s2_pattern, sf_bench.causal_pattern):
            out = sinklora.sf_attention(q, k, v, backend="triton", **pattern(shape))
            out.backward(do)
    shape, = h2o_bench.shapes(torch.device("cuda"), n_values=(16384,), batch_values=(8,),
                              model_names=["llama3-8b"])
    ctx = h2o_bench.Context(shape, cpu)
    heavy, recent = h2o_bench.split_budget(shape, 0.5)
    budget = dict(heavy_budget=heavy, recent_budget=recent)
    _, state = sinklora.h2o_prefill(ctx.q_prompt, ctx.k_prompt, ctx.v_prompt, backend="triton",
                                    **budget)
    sinklora.h2o_decode(ctx.q_new, state, ctx.k_new, ctx.v_new, backend="triton", **budget)


def tune():
    """``bench.tune_sf --quick``'s candidates at its default shape, the headline one."""
    import torch

    from bench import sf_attn as sf_bench
    from bench import tune_sf
    from sinklora.kernels import sf_attn as launchers

    shape, = sf_bench.shapes(torch.device("cuda"), n_values=(16384,), hkv_values=(8,))
    g, s, hq, d = shape.G, shape.S, shape.Hq, shape.D
    q, k, v, do = (t.detach() for t in sf_bench.make_inputs(shape, torch.device("cpu")))
    default = launchers.tiles(d, shape.dtype)
    for kernel, candidates in tune_sf.QUICK.items():
        for candidate in map(launchers.Tile._make, candidates):
            chosen = {**default, kernel: candidate}
            o, lse = launchers.sf_attn_forward(q, k, v, g, s, hq // 2, False, d ** -0.5,
                                               tile=chosen["fwd"])
            if kernel != "fwd":
                launchers.sf_attn_backward(do, q, k, v, o, lse, g, s, hq // 2, False, d ** -0.5,
                                           tiles=chosen)


def check():
    """A few toy launches (SF-Attn forward and backward, H2O prefill and decode), to check
    that a cache is made and then hit."""
    import torch

    import sinklora

    q, k, v = (torch.randn(1, h, 80, 64, dtype=torch.float16, requires_grad=True)
               for h in (4, 2, 2))
    sinklora.sf_attention(q, k, v, group_size=32, backend="triton").sum().backward()
    budget = dict(heavy_budget=40, recent_budget=8, num_sink=4)
    _, state = sinklora.h2o_prefill(q.detach(), k.detach(), v.detach(), backend="triton",
                                    **budget)
    sinklora.h2o_decode(q[:, :, 0].detach(), state, k[:, :, 0].detach(), v[:, :, 0].detach(),
                        backend="triton", **budget)


def long():
    """``bench.long_sequence --N 131072``."""
    import torch

    from bench import long_sequence
    from sinklora import sf_attention

    case = next(c for c in long_sequence.GPU_CASES if c.N == 131072)
    q, k, v = long_sequence.make_inputs(case.B, case.Hq, case.Hkv, case.N, case.D, case.dtype,
                                        torch.device("cpu"))
    out = sf_attention(q, k, v, group_size=case.G, num_sink=case.S,
                       softmax_scale=case.D ** -0.5, backend="triton")
    torch.autograd.grad(out, (q, k, v), torch.randn(q.shape, dtype=torch.bfloat16))


FIRST_LIGHT = {"smoke": smoke, "headline": headline, "tune": tune, "long": long}
WORKLOADS = {**FIRST_LIGHT, "check": check}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=REPO / "build" / "triton-cache")
    ap.add_argument("--parts", nargs="+", choices=list(WORKLOADS), default=list(FIRST_LIGHT),
                    help="first light's parts (default: all); check: a few toy launches")
    ap.add_argument("--key", choices=("device", "local"), default="device",
                    help="the GPU machine's Triton key (default), or this machine's own (a "
                         "GPU machine with this very Triton build; the mechanism's check)")
    args = ap.parse_args(argv)
    # Read by Triton and by the tests' conftest when they are imported.
    os.environ.update(TRITON_INTERPRET="0", TRITON_STORE_BINARY_ONLY="1",
                      TRITON_CACHE_DIR=str(args.cache_dir))
    import triton
    from triton.runtime.cache import triton_key

    from bench import common

    if args.key == "local":
        key = triton_key()
    elif triton.__version__ in DEVICE_LIBTRITON:
        key = triton_key().replace(libtriton_sha256(), DEVICE_LIBTRITON[triton.__version__])
    else:
        sys.exit(f"triton {triton.__version__} here; the GPU machine's is one of "
                 f"{sorted(DEVICE_LIBTRITON)}: run with that version (make warm-gpu-cache)")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    counts = {True: 0, False: 0}

    def listener(cache_hit, **_):
        counts[cache_hit] += 1

    triton.knobs.compilation.listener = listener
    start = time.monotonic()
    with compile_only(key):
        for name in args.parts:
            t0, before = time.monotonic(), dict(counts)
            WORKLOADS[name]()
            print(f"warm {name}: {time.monotonic() - t0:.0f} s, {counts[False] - before[False]} "
                  f"compiled, {counts[True] - before[True]} loaded from the cache", flush=True)
    triton.knobs.compilation.listener = None
    record = {"triton": triton.__version__, "device_key_sha256": key_digest(key),
              "kernels": sum(1 for p in args.cache_dir.iterdir() if p.is_dir()),
              "git_sha": common.git_sha(), "parts": args.parts,
              "compiled": counts[False], "loaded": counts[True],
              "seconds": round(time.monotonic() - start)}
    (args.cache_dir / "WARMED.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
