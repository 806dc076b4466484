"""SF-Attn training attention: sinklora's kernels against what a user would pick instead.

Providers, each timed for fwd, bwd and fwd+bwd on the same inputs:

- ``sinklora_triton``: ``sinklora.sf_attention(..., backend="triton")`` (GPU only).
- ``sinklora_torch``: the PyTorch fallback, ``backend="torch"``.
- ``flex``: FlexAttention with the identical per-head mask, its ``mask_mod`` built from
  ``sinklora.kernels.pattern.plain.visible``; compiled on CUDA, block mask built once outside
  the timing, GQA through ``enable_gqa``. On CPU FlexAttention has no backward and is not
  compiled here, so only its eager forward runs (a check of the mask more than a timing).
- ``longlora_s2``: LongLoRA's algorithm in PyTorch (roll the shifted half of the heads by
  ``-G/2``, reshape into groups, causal SDPA per group, roll back; GQA by repeating k/v). That is
  ``mode="s2"`` with no sinks, so it is gated against sinklora in that mode.
- ``sdpa_causal``: dense causal SDPA, the full attention SF-Attn replaces; the note says which
  SDPA backend ran.

Before timing, each provider's output and gradients are compared once with sinklora's (the
correctness gate); a provider that fails it gets an error row instead of timings.

Useful TFLOP/s count only the (query, key) pairs the provider's pattern makes visible, counted
exactly from ``sinklora.kernels.pattern``: ``4 * D`` flops per pair forward (two matmuls),
2.5 times that backward.
"""
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import common
from bench.common import Provider

KERNEL = "sf_attn"
PASSES = ("fwd", "bwd", "fwd+bwd")
BWD_FLOPS_FACTOR = 2.5
GPU_N = (2048, 4096, 8192, 16384, 32768)
# N = 16k first: the dense-SDPA target is stated there, and a run that hits its time budget
# should have it.
GPU_N_DEFAULT = (16384, 8192)
# The PyTorch fallback holds about four fp32 [group, sink + group] rectangles per head and group
# (scores, masked scores, probabilities, their gradient). Above this estimate it is not tried as
# the gate's reference on CUDA; the Triton kernels are.
FALLBACK_REFERENCE_BYTES = 40 * 2**30


@dataclass(frozen=True)
class Shape:
    B: int
    Hq: int
    Hkv: int
    N: int
    D: int
    G: int
    S: int
    dtype: torch.dtype

    def columns(self):
        return {"B": self.B, "Hq": self.Hq, "Hkv": self.Hkv, "N": self.N, "D": self.D,
                "G": self.G, "S": self.S, "dtype": str(self.dtype).replace("torch.", "")}

    def __str__(self):
        return " ".join(f"{k}={v}" for k, v in self.columns().items())


def shapes(device, full=False, n_values=None, hkv_values=None, tiny=False):
    """The benchmark's shapes on CUDA (G = N/4, S = 4); small fp32 ones on CPU."""
    if device.type == "cuda":
        b, hq, d, dtype = 1, 32, 128, torch.bfloat16
        n_values = n_values or (GPU_N if full else GPU_N_DEFAULT)
        hkv_values = hkv_values or (32, 8)
    elif tiny:
        b, hq, d, dtype = 1, 4, 16, torch.float32
        n_values, hkv_values = n_values or (64,), hkv_values or (4, 2)
    else:
        b, hq, d, dtype = 1, 4, 64, torch.float32
        n_values, hkv_values = n_values or (256, 512), hkv_values or (4, 2)
    return [Shape(b, hq, hkv, n, d, n // 4, 4, dtype) for n in n_values for hkv in hkv_values]


# --- what each provider computes, as sinklora.sf_attention arguments --------------------------

def sf_pattern(shape):
    return {"group_size": shape.G, "num_sink": shape.S, "shift_heads": shape.Hq // 2,
            "mode": "sf"}


def s2_pattern(shape):
    # LongLoRA shifts heads Hq // 2 .. Hq - 1, i.e. the last Hq - Hq // 2.
    return {"group_size": shape.G, "num_sink": 0, "shift_heads": shape.Hq - shape.Hq // 2,
            "mode": "s2"}


def causal_pattern(shape):
    # One group covering the sequence is full causal attention (an identity of the spec).
    return {"group_size": shape.N + shape.N % 2, "num_sink": shape.S, "shift_heads": 0,
            "mode": "sf"}


def visible_pairs(shape, pattern):
    """Exact number of visible (query, key) pairs summed over batch and query heads."""
    from sinklora.kernels.pattern import plain

    n, g, s = shape.N, pattern["group_size"], pattern["num_sink"]
    i = torch.arange(n, dtype=torch.int64)
    total = 0
    for h in range(shape.Hq):
        shift = plain.head_shift(h, shape.Hq, pattern["shift_heads"], g)
        start = plain.group_start(i, g, shift)
        wrap_from = plain.wrap_start(shift, n, int(pattern["mode"] == "s2"))
        in_group = i - start + 1            # group_start(i) <= j <= i
        in_sink = start.clamp(max=s)        # j < num_sink and j < group_start(i)
        in_wrap = (i < shift) * (n - wrap_from)
        total += int((in_group + in_sink + in_wrap).sum())
    return shape.B * total


def flops(shape, pattern, pass_):
    fwd = 4 * shape.D * visible_pairs(shape, pattern)
    factor = {"fwd": 1.0, "bwd": BWD_FLOPS_FACTOR, "fwd+bwd": 1.0 + BWD_FLOPS_FACTOR}[pass_]
    return factor * fwd


# --- providers: each returns a Provider, fn(q, k, v) -> out, gated against sinklora's ----------

def make_sinklora(backend):
    def make(shape, device, q, k, v, do):
        import sinklora

        pattern = sf_pattern(shape)
        return Provider(lambda q, k, v: sinklora.sf_attention(q, k, v, backend=backend, **pattern),
                        pattern=pattern)
    return make


def make_flex(shape, device, q, k, v, do):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from sinklora.kernels.pattern import plain

    pattern = sf_pattern(shape)
    g, s, n = shape.G, shape.S, shape.N
    shift = torch.tensor([plain.head_shift(h, shape.Hq, pattern["shift_heads"], g)
                          for h in range(shape.Hq)], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        head_shift = shift[h]
        return plain.visible(q_idx, kv_idx, g, head_shift, s, plain.wrap_start(head_shift, n, 0), n)

    compiled = device.type == "cuda"
    if compiled:
        # Every shape compiles the mask and the attention anew; past dynamo's recompile limit
        # (8 by default) it would silently fall back to eager, which materializes N x N.
        from torch import _dynamo

        config = _dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, limit):
                setattr(config, limit, max(64, getattr(config, limit)))
        if hasattr(config, "fail_on_recompile_limit_hit"):
            config.fail_on_recompile_limit_hit = True
    t0 = time.perf_counter()
    # Compiled mask creation never materializes the [Hq, N, N] mask (32 GB at N = 32k).
    # (torch.compile of the function, as torch >= 2.11 asks instead of its _compile flag.)
    make_mask = torch.compile(create_block_mask) if compiled else create_block_mask
    block_mask = make_mask(mask_mod, None, shape.Hq, n, n, device=device)
    common.synchronize(device)
    note = f"block mask {time.perf_counter() - t0:.1f}s"
    gqa = shape.Hq != shape.Hkv
    if compiled:
        attn = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        return Provider(lambda q, k, v: attn(q, k, v, block_mask=block_mask, enable_gqa=gqa),
                        note, pattern=pattern)
    # FlexAttention refuses inputs that require grad on CPU: it has no CPU backward. Its
    # warning about running uncompiled is what the note says already.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    note += "; eager, forward only (no FlexAttention backward on CPU)"
    return Provider(lambda q, k, v: flex_attention(q.detach(), k.detach(), v.detach(),
                                                   block_mask=block_mask, enable_gqa=gqa),
                    note, pattern=pattern)


def longlora_s2(q, k, v, group_size):
    """LongLoRA's S2-Attn as its PyTorch path computes it: GQA by repeating k/v heads, the
    second half of the heads rolled by ``-group_size // 2``, the sequence cut into groups that
    become batch entries, causal attention per group, then the inverse reshape and roll.

    ``q`` ``[B, Hq, N, D]``, ``k``/``v`` ``[B, Hkv, N, D]``, ``N % group_size == 0``.
    """
    b, hq, n, d = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    half, first_shifted, groups = group_size // 2, hq // 2, n // group_size

    def to_groups(x):
        x = torch.cat([x[:, :first_shifted], x[:, first_shifted:].roll(-half, dims=2)], dim=1)
        x = x.reshape(b, hq, groups, group_size, d).transpose(1, 2)
        return x.reshape(b * groups, hq, group_size, d)

    out = F.scaled_dot_product_attention(to_groups(q), to_groups(k), to_groups(v), is_causal=True)
    out = out.reshape(b, groups, hq, group_size, d).transpose(1, 2).reshape(b, hq, n, d)
    return torch.cat([out[:, :first_shifted], out[:, first_shifted:].roll(half, dims=2)], dim=1)


def make_longlora(shape, device, q, k, v, do):
    # What each of longlora_s2's SDPA calls sees: Hq heads (k/v repeated), G tokens.
    group = q[:, :, :shape.G]
    backend = common.sdpa_choice(group, group, group, is_causal=True)
    return Provider(lambda q, k, v: longlora_s2(q, k, v, shape.G),
                    f'mode="s2", no sinks; GQA by repeat; SDPA backend (auto) {backend}',
                    pattern=s2_pattern(shape))


def make_sdpa(shape, device, q, k, v, do):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = shape.Hq != shape.Hkv
    rep = shape.Hq // shape.Hkv
    # Flash first: it is what a user of dense attention gets on an H100 when it runs.
    if gqa:
        candidates = [(SDPBackend.FLASH_ATTENTION, True), (SDPBackend.FLASH_ATTENTION, False),
                      (SDPBackend.CUDNN_ATTENTION, False), (SDPBackend.EFFICIENT_ATTENTION, False),
                      (SDPBackend.MATH, True)]
    else:
        candidates = [(b, False) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                           SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)]
    failures = []
    for backend, native_gqa in candidates:
        def fn(q, k, v, backend=backend, native_gqa=native_gqa):
            if gqa and not native_gqa:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      enable_gqa=gqa and native_gqa)
        try:
            fn(q, k, v).backward(do)
        except RuntimeError as exc:
            failures.append(f"{backend.name}: {common.short_error(exc)}")
            continue
        finally:
            for t in (q, k, v):
                t.grad = None
        how = ("GQA native" if native_gqa else "GQA by repeat") if gqa else "MHA"
        return Provider(fn, f"SDPA backend {backend.name}, {how}", pattern=causal_pattern(shape))
    raise RuntimeError("no SDPA backend ran: " + "; ".join(failures))


PROVIDERS = {
    "sinklora_triton": make_sinklora("triton"),
    "flex": make_flex,
    "sdpa_causal": make_sdpa,
    "longlora_s2": make_longlora,
    "sinklora_torch": make_sinklora("torch"),
}
GPU_ONLY = ("sinklora_triton",)


# --- the correctness gate's reference ---------------------------------------------------------

def _fwd_bwd(fn, q, k, v, do):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(do)
    result = (out.detach(), q.grad, k.grad, v.grad)
    for t in (q, k, v):
        t.grad = None
    return result


def reference(shape, pattern, device, q, k, v, do):
    """sinklora's output and gradients for ``pattern``, and the backend that produced them.

    The PyTorch fallback (fp32 accumulation) is preferred; on CUDA, where its saved
    probabilities would not fit (``FALLBACK_REFERENCE_BYTES``) or it fails, the Triton kernels.
    """
    import sinklora

    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    group = min(pattern["group_size"], shape.N)
    fallback_bytes = 4 * 4 * shape.B * shape.Hq * shape.N * (group + pattern["num_sink"])
    if device.type == "cuda" and fallback_bytes > FALLBACK_REFERENCE_BYTES:
        backends.reverse()
    errors = []
    for backend in backends:
        try:
            def fn(q, k, v, backend=backend):
                return sinklora.sf_attention(q, k, v, backend=backend, **pattern)
            return _fwd_bwd(fn, q, k, v, do), backend
        except Exception as exc:  # noqa: BLE001  OOM, a Triton compile error: try the next
            errors.append(f"{backend}: {common.short_error(exc)}")
        common.free_memory(device, after_failure=True)
    raise common.GateError("no sinklora reference: " + "; ".join(errors))


class References:
    """Computes each pattern's reference at most once per shape."""

    def __init__(self, shape, device, q, k, v, do):
        self.args = (shape, device, q, k, v, do)
        self.cache = {}

    def get(self, pattern):
        key = tuple(sorted(pattern.items()))
        if key not in self.cache:
            try:
                self.cache[key] = reference(self.args[0], pattern, *self.args[1:])
            except common.GateError as exc:
                self.cache[key] = exc
        if isinstance(self.cache[key], Exception):
            raise self.cache[key]
        return self.cache[key]


# --- one provider on one shape ----------------------------------------------------------------

def _passes(name, device):
    if name == "flex" and device.type != "cuda":
        return ("fwd",)
    return PASSES


def _measure(pass_, fn, q, k, v, do, device):
    """``([p20, p50, p80] ms, peak MiB)`` of one pass; ``bwd`` reuses one forward graph."""
    grads = [q, k, v]
    if pass_ == "fwd":
        run = lambda: fn(q, k, v)  # noqa: E731
    elif pass_ == "bwd":
        out = fn(q, k, v)
        run = lambda: out.backward(do, retain_graph=True)  # noqa: E731
    else:
        run = lambda: fn(q, k, v).backward(do)  # noqa: E731
    ms = common.time_ms(run, device, grad_to_none=grads)
    for t in grads:
        t.grad = None
    peak = common.peak_memory_mb(run, device)
    for t in grads:
        t.grad = None
    return ms, peak


def bench_provider(name, inputs, base_row):
    """Rows for one provider on one shape (``inputs`` from ``prepare``): one per pass, or error
    rows."""
    shape, device, q, k, v, do, refs = inputs
    passes = _passes(name, device)
    label = f"{name} {shape}"
    try:
        provider = PROVIDERS[name](shape, device, q, k, v, do)
        fn, note = provider.fn, provider.note
        (ref, ref_backend) = refs.get(provider.pattern)
        t0 = time.perf_counter()
        if "bwd" not in passes:
            got = (fn(q, k, v),)
        else:
            got = _fwd_bwd(fn, q, k, v, do)
        first_call = time.perf_counter() - t0
        if name == f"sinklora_{ref_backend}":
            note = "; ".join(filter(None, [note, "the gate's reference"]))
        else:
            err = common.gate(name, got, ref, shape.dtype)
            gate_note = f"gate rel.err {err:.1e} vs sinklora {ref_backend}"
            note = "; ".join(filter(None, [note, gate_note]))
        if name == "flex" and device.type == "cuda":
            note += f"; compile + first fwd+bwd {first_call:.0f}s"
        del got
    except Exception as exc:  # noqa: BLE001  any failure is recorded, the run goes on
        error = common.failed(base_row, label, exc)
        return [dict(error, provider=name, **{"pass": p}) for p in passes]

    rows = []
    for pass_ in passes:
        row = dict(base_row, provider=name, note=note, **{"pass": pass_})
        try:
            ms, peak = _measure(pass_, fn, q, k, v, do, device)
            row.update(common.quantile_columns(ms), peak_mem_mb=peak,
                       tflops=flops(shape, provider.pattern, pass_) / (ms[1] * 1e-3) / 1e12,
                       timestamp=common.timestamp())
        except Exception as exc:  # noqa: BLE001
            row = common.failed(row, f"{label} {pass_}", exc)
            common.free_memory(device, after_failure=True)
        rows.append(row)
    return rows


def make_inputs(shape, device):
    def rand(h):
        return torch.randn(shape.B, h, shape.N, shape.D, device=device, dtype=shape.dtype,
                           requires_grad=True)
    do = torch.randn(shape.B, shape.Hq, shape.N, shape.D, device=device, dtype=shape.dtype)
    return rand(shape.Hq), rand(shape.Hkv), rand(shape.Hkv), do


def prepare(shape, device):
    """A shape's inputs, seeded by the shape, and the cache of its gate's references."""
    torch.manual_seed(shape.N * 131 + shape.Hkv)
    inputs = make_inputs(shape, device)
    return (shape, device, *inputs, References(shape, device, *inputs))


def run(device, csv_path, env, deadline, shape_list, providers=None):
    """Benchmarks every provider on every shape, appending rows to ``csv_path`` as they come.

    Returns the rows written.
    """
    providers = providers or [p for p in PROVIDERS if device.type == "cuda" or p not in GPU_ONLY]
    return common.run(KERNEL, device, csv_path, env, deadline, shape_list, providers,
                      lambda shape: prepare(shape, device), bench_provider)


def main(argv=None):
    ap = common.script_parser(__doc__, "every N of the benchmark (GPU)")
    ap.add_argument("--N", type=int, nargs="+", help="sequence lengths (default per device)")
    ap.add_argument("--hkv", type=int, nargs="+", help="k/v head counts")
    ap.add_argument("--providers", nargs="+", choices=list(PROVIDERS))
    args = ap.parse_args(argv)
    device, env = common.start(args)
    run(device, args.results_dir / f"{KERNEL}.csv", env, common.Deadline(args.time_budget),
        shapes(device, args.full, args.N, args.hkv, args.tiny), args.providers)


if __name__ == "__main__":
    sys.exit(main())
