"""H2O decoding: per-step attention latency and KV bytes of sinklora's heavy-hitter cache against
keeping every token; and the prefill's score-pass overhead.

Decode (pass ``decode``; one new token per sequence, the cache already holding a context of
``N`` tokens; one row per step timing, the state updated in place at every timed step):

- ``sinklora_h2o_50``, ``sinklora_h2o_20``: ``sinklora.h2o_decode(..., backend="triton")``, the
  fused kernel, with a total budget of 50% / 20% of the context (half heavy hitters, half
  recent, no sinks), the state built by ``sinklora.h2o_prefill`` from the context.
- ``torch_h2o_50``: the same step through the plain-PyTorch H2O (``backend="torch"``).
- ``full_sdpa``: transformers' ``DynamicCache`` (its ``update``, a ``torch.cat`` of the new
  token onto all ``N``) plus SDPA over all ``N + 1`` tokens, GQA native. The cache is put back
  to ``N`` tokens after each timed step, so every step sees the same length.
- ``static_sdpa``: SDPA over a preallocated ``N + 1``-slot cache the new token is written into
  (what a static cache costs), for reference: it is the stronger full-cache baseline.

On CUDA the note also gives the host (CPU) time per step when 50 steps are issued back to
back without synchronizing: a step cannot be faster than that, which is what bounds decoding
at batch 1 when the GPU's share is shorter.

``gb_s`` counts the K/V bytes the step's attention reads (``2 * B * Hkv * entries * D *
itemsize``, entries: the budget's plus the new token for H2O, ``N + 1`` for a full cache);
``kv_bytes`` is what the layer stores after the step (for H2O its key and value buffers). One
attention layer.

Prefill (pass ``prefill``): ``sdpa_prefill`` is plain causal SDPA over the prompt;
``sinklora_h2o_prefill_50`` is ``sinklora.h2o_prefill`` (the same attention plus the per-key
column sums of the probabilities and the selection of the kept entries) at a 50% budget. Their
ratio is the score pass's overhead.

Gates before timing: the fused decode step against the plain-PyTorch step on a copy of the same
state (output, and the same set of kept positions); the full-cache steps against a float64
attention over all tokens; the H2O prefill's output against SDPA's, and for its last
(sequence, kv head) the kept entries' scores against the plain-PyTorch column sums of that
pair, the recent window kept and no evicted token scoring above a kept one.
"""
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import common
from bench.common import Provider

KERNEL = "h2o_decode"
GPU_MODELS = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # Hq, Hkv, D
CPU_MODELS = {"mha": (4, 4, 64), "gqa": (4, 2, 64)}
TINY_MODELS = {"mha": (4, 4, 16), "gqa": (4, 2, 16)}
GPU_N = (4096, 8192, 16384, 32768)
GPU_N_DEFAULT = (4096, 16384)
# Share of (sequence, kv head) pairs whose kept set may differ after the gate's step.
MAX_KEPT_MISMATCH = 0.01


@dataclass(frozen=True)
class Shape:
    model: str
    B: int
    Hq: int
    Hkv: int
    N: int
    D: int
    dtype: torch.dtype

    def columns(self):
        return {"B": self.B, "Hq": self.Hq, "Hkv": self.Hkv, "N": self.N, "D": self.D,
                "S": 0, "dtype": str(self.dtype).replace("torch.", "")}

    def __str__(self):
        return f"{self.model} " + " ".join(f"{k}={v}" for k, v in self.columns().items())

    def kv_bytes(self, entries):
        """Bytes of keys and values for ``entries`` tokens per sequence and kv head."""
        return 2 * self.B * self.Hkv * entries * self.D * self.dtype.itemsize


def shapes(device, full=False, n_values=None, batch_values=None, tiny=False, model_names=None):
    """Llama-2-7B / Llama-3-8B attention shapes in bf16 on CUDA; small fp32 ones on CPU.
    ``model_names`` keeps those models only (CPU: ``mha`` / ``gqa``)."""
    if device.type == "cuda":
        models, dtype = GPU_MODELS, torch.bfloat16
        n_values = n_values or (GPU_N if full else GPU_N_DEFAULT)
        batch_values = batch_values or (1, 8)
    elif tiny:
        models, dtype = TINY_MODELS, torch.float32
        n_values, batch_values = n_values or (64,), batch_values or (2,)
    else:
        models, dtype = CPU_MODELS, torch.float32
        n_values, batch_values = n_values or (256, 512), batch_values or (1, 2)
    unknown = set(model_names or ()) - set(models)
    if unknown:
        raise ValueError(f"--models: {sorted(unknown)} not among {sorted(models)} on this device")
    return [Shape(name, b, hq, hkv, n, d, dtype) for n in n_values for b in batch_values
            for name, (hq, hkv, d) in models.items() if not model_names or name in model_names]


def split_budget(shape, fraction):
    """``(heavy_budget, recent_budget)``: ``fraction`` of the context, half of each kind."""
    total = max(2, int(shape.N * fraction))
    return total // 2, total - total // 2


def clone_state(state):
    from sinklora.h2o import H2OState

    return H2OState(state.key_buffer.clone(), state.value_buffer.clone(),
                    state.position_buffer.clone(), state.score_buffer.clone(), state.length,
                    state.next_position.clone())


class Context:
    """One shape's inputs: the prompt (context), the new token, and H2O states built once per
    budget from the prompt."""

    def __init__(self, shape, device):
        self.shape, self.device = shape, device

        def rand(*size):
            return torch.randn(*size, device=device, dtype=shape.dtype)

        b, hq, hkv, n, d = shape.B, shape.Hq, shape.Hkv, shape.N, shape.D
        self.q_prompt = rand(b, hq, n, d)
        self.k_prompt, self.v_prompt = rand(b, hkv, n, d), rand(b, hkv, n, d)
        self.q_new, self.k_new, self.v_new = rand(b, hq, d), rand(b, hkv, d), rand(b, hkv, d)
        self.states = {}

    def state(self, fraction):
        """A fresh copy of the H2O state after prefilling the context at this budget."""
        import sinklora

        if fraction not in self.states:
            heavy, recent = split_budget(self.shape, fraction)
            backend = "triton" if self.device.type == "cuda" else "torch"
            _, self.states[fraction] = sinklora.h2o_prefill(
                self.q_prompt, self.k_prompt, self.v_prompt, heavy_budget=heavy,
                recent_budget=recent, backend=backend)
        return clone_state(self.states[fraction])

    def full_reference(self):
        """float64 attention of the new query over the context and the new token."""
        b, hq, hkv, d = self.shape.B, self.shape.Hq, self.shape.Hkv, self.shape.D
        k = torch.cat([self.k_prompt, self.k_new[:, :, None]], 2).double()
        v = torch.cat([self.v_prompt, self.v_new[:, :, None]], 2).double()
        q = self.q_new.double().reshape(b, hkv, hq // hkv, d)  # GQA without repeating k/v
        p = torch.softmax(torch.einsum("bgrd,bgnd->bgrn", q, k) / d ** 0.5, -1)
        return torch.einsum("bgrn,bgnd->bgrd", p, v).reshape(b, hq, d)


# --- decode providers: each returns a Provider, fn() -> output [B, Hq, D] -----------------------

def make_h2o(fraction, backend):
    def make(ctx):
        import sinklora

        heavy, recent = split_budget(ctx.shape, fraction)
        state = ctx.state(fraction)

        def step(state=state, backend=backend):
            out, _ = sinklora.h2o_decode(ctx.q_new, state, ctx.k_new, ctx.v_new,
                                         heavy_budget=heavy, recent_budget=recent, backend=backend)
            return out

        def kv_bytes():
            return sum(t.numel() * t.element_size() for t in (state.key_buffer, state.value_buffer))

        def check():
            if backend == "torch":
                return "the gate's reference"
            ours, theirs = ctx.state(fraction), ctx.state(fraction)
            out = step(ours)
            ref = step(theirs, "torch")
            err = common.gate(f"h2o {backend}", [out], [ref], ctx.shape.dtype)
            kept, kept_ref = (s.positions.sort(-1).values for s in (ours, theirs))
            # Summation order differs between the two, so a near tie for the smallest score
            # may evict another entry; a broken kernel disagrees far more often than that.
            differ = (kept != kept_ref).any(-1).float().mean().item()
            if differ > MAX_KEPT_MISMATCH:
                raise common.GateError(f"kept positions differ from the plain-PyTorch step's "
                                       f"in {differ:.1%} of (sequence, kv head) pairs")
            return (f"gate rel.err {err:.1e} vs torch H2O, kept positions differ in "
                    f"{differ:.1%} of (sequence, kv head) pairs")

        return Provider(step, f"heavy {heavy} + recent {recent}, no sinks", check,
                        budget=heavy + recent, kv_bytes=kv_bytes)
    return make


def make_full_dynamic(ctx):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(ctx.k_prompt, ctx.v_prompt, 0)
    layer = cache.layers[0]
    context = (layer.keys, layer.values)
    gqa = ctx.shape.Hq != ctx.shape.Hkv

    def step():
        keys, values = cache.update(ctx.k_new[:, :, None], ctx.v_new[:, :, None], 0)
        out = F.scaled_dot_product_attention(ctx.q_new[:, :, None], keys, values, enable_gqa=gqa)
        layer.keys, layer.values = context  # back to N tokens: every step sees the same length
        return out[:, :, 0]

    return Provider(step, "DynamicCache.update (torch.cat) + "
                    + _sdpa_note(ctx.q_new[:, :, None], *context, enable_gqa=gqa),
                    _full_gate(ctx, step), kv_bytes=lambda: ctx.shape.kv_bytes(ctx.shape.N + 1))


def make_full_static(ctx):
    n = ctx.shape.N
    keys = torch.cat([ctx.k_prompt, torch.empty_like(ctx.k_prompt[:, :, :1])], 2)
    values = torch.cat([ctx.v_prompt, torch.empty_like(ctx.v_prompt[:, :, :1])], 2)
    gqa = ctx.shape.Hq != ctx.shape.Hkv

    def step():
        keys[:, :, n] = ctx.k_new
        values[:, :, n] = ctx.v_new
        return F.scaled_dot_product_attention(ctx.q_new[:, :, None], keys, values,
                                              enable_gqa=gqa)[:, :, 0]

    return Provider(step, "preallocated N+1 slots, in-place write + "
                    + _sdpa_note(ctx.q_new[:, :, None], keys, values, enable_gqa=gqa),
                    _full_gate(ctx, step), kv_bytes=lambda: ctx.shape.kv_bytes(n + 1))


def _sdpa_note(query, key, value, enable_gqa, **kwargs):
    backend = common.sdpa_choice(query, key, value, enable_gqa=enable_gqa, **kwargs)
    return f"SDPA backend (auto) {backend}, " + ("GQA native" if enable_gqa else "MHA")


def _full_gate(ctx, step):
    def check():
        err = common.gate("full cache", [step()], [ctx.full_reference()], ctx.shape.dtype)
        return f"gate rel.err {err:.1e} vs float64 attention"
    return check


DECODE_PROVIDERS = {
    "sinklora_h2o_50": make_h2o(0.5, "triton"),
    "sinklora_h2o_20": make_h2o(0.2, "triton"),
    "torch_h2o_50": make_h2o(0.5, "torch"),
    "full_sdpa": make_full_dynamic,
    "static_sdpa": make_full_static,
}


# --- prefill providers: each returns a Provider, fn() -> output [B, Hq, N, D] --------------------

def make_sdpa_prefill(ctx):
    gqa = ctx.shape.Hq != ctx.shape.Hkv

    def run():
        return F.scaled_dot_product_attention(ctx.q_prompt, ctx.k_prompt, ctx.v_prompt,
                                              is_causal=True, enable_gqa=gqa)
    return Provider(run, "causal " + _sdpa_note(ctx.q_prompt, ctx.k_prompt, ctx.v_prompt,
                                                is_causal=True, enable_gqa=gqa),
                    lambda: "the prefill gate's reference")


def make_h2o_prefill(fraction, backend):
    def make(ctx):
        import sinklora

        heavy, recent = split_budget(ctx.shape, fraction)

        def prefill():
            return sinklora.h2o_prefill(ctx.q_prompt, ctx.k_prompt, ctx.v_prompt,
                                        heavy_budget=heavy, recent_budget=recent,
                                        backend=backend)

        def run():
            return prefill()[0]

        def check():
            out, state = prefill()
            ref = make_sdpa_prefill(ctx).fn()
            err = common.gate(f"h2o prefill {backend}", [out], [ref], ctx.shape.dtype)
            score_err = _check_kept(ctx, state, recent)
            return (f"gate rel.err {err:.1e} vs causal SDPA, last (sequence, kv head)'s scores "
                    f"{score_err:.1e} vs torch H2O, its kept set the top scores")

        return Provider(run, "attention + column sums + selection", check, budget=heavy + recent)
    return make


def _check_kept(ctx, state, recent):
    """Raises ``GateError`` unless the prefill ``state`` of the last (sequence, kv head) holds
    the scores the plain-PyTorch prefill computes for that pair (a run that keeps every token)
    and keeps the recent window plus the highest-scoring other tokens. Returns the scores'
    relative error."""
    import sinklora

    shape = ctx.shape
    b, h, n, group = shape.B - 1, shape.Hkv - 1, shape.N, shape.Hq // shape.Hkv
    _, every = sinklora.h2o_prefill(
        ctx.q_prompt[b:b + 1, h * group:(h + 1) * group], ctx.k_prompt[b:b + 1, h:h + 1],
        ctx.v_prompt[b:b + 1, h:h + 1], heavy_budget=n, recent_budget=0, backend="torch")
    ref = torch.empty_like(every.scores[0, 0])
    ref[every.positions[0, 0]] = every.scores[0, 0]
    kept, scores = state.positions[b, h], state.scores[b, h]
    err = common.rel_err(scores, ref[kept])
    if not err <= common.GATE_TOLERANCE[shape.dtype]:
        raise common.GateError(f"h2o prefill: the scores of the kept entries differ from torch "
                               f"H2O's by rel. error {err:.2e}")
    is_kept = torch.zeros(n, dtype=torch.bool, device=kept.device)
    is_kept[kept] = True
    if int(is_kept.sum()) != kept.numel():
        raise common.GateError("h2o prefill: a position is stored twice")
    if not is_kept[n - recent:].all():
        raise common.GateError(f"h2o prefill: the {recent} most recent tokens are not all kept")
    older, older_kept = ref[:n - recent], is_kept[:n - recent]
    if older_kept.any() and not older_kept.all():
        # Each score may be off by about the largest error seen: a tie can go either way.
        slack = 2 * (scores - ref[kept]).abs().max() + 1e-6 * ref.abs().max()
        lowest_kept, highest_left = older[older_kept].min(), older[~older_kept].max()
        if lowest_kept < highest_left - slack:
            raise common.GateError(f"h2o prefill: kept a token of score {lowest_kept:.4g} and "
                                   f"evicted one of {highest_left:.4g}")
    return err


PREFILL_PROVIDERS = {
    "sdpa_prefill": make_sdpa_prefill,
    "sinklora_h2o_prefill_50": make_h2o_prefill(0.5, "triton"),
    "torch_h2o_prefill_50": make_h2o_prefill(0.5, "torch"),
}
GPU_ONLY = ("sinklora_h2o_50", "sinklora_h2o_20", "sinklora_h2o_prefill_50")
# The plain-PyTorch prefill walks the prompt in chunks of queries against all keys: minutes at
# the GPU shapes, and not what the question is about.
CPU_ONLY = ("torch_h2o_prefill_50",)


def bench(name, ctx, base_row):
    """The row of one decode or prefill provider on the shape of ``ctx``."""
    shape, device = ctx.shape, ctx.device
    decode = name in DECODE_PROVIDERS
    row = dict(base_row, provider=name, **{"pass": "decode" if decode else "prefill"})
    try:
        provider = (DECODE_PROVIDERS if decode else PREFILL_PROVIDERS)[name](ctx)
        note = "; ".join([provider.note, provider.gate()])
        ms = common.time_ms(provider.fn, device)
        row.update(common.quantile_columns(ms), budget=provider.budget,
                   peak_mem_mb=common.peak_memory_mb(provider.fn, device))
        if decode:
            host = common.host_ms_per_call(provider.fn, device)
            if host is not None:
                note += f"; host {host * 1e3:.1f} us/step issued back to back"
            # An H2O step attends to its budget's entries plus the new token's.
            read = provider.budget + 1 if provider.budget else shape.N + 1
            row.update(gb_s=shape.kv_bytes(read) / (ms[1] * 1e-3) / 1e9,
                       kv_bytes=provider.kv_bytes())
        else:
            # Useful work of causal attention over the prompt: 4 * D flops per visible pair.
            pairs = shape.B * shape.Hq * shape.N * (shape.N + 1) // 2
            row["tflops"] = 4 * shape.D * pairs / (ms[1] * 1e-3) / 1e12
    except Exception as exc:  # noqa: BLE001  any failure is recorded, the run goes on
        return [common.failed(row, f"{name} {shape}", exc)]
    return [dict(row, note=note, timestamp=common.timestamp())]


def run(device, csv_path, env, deadline, shape_list, providers=None):
    """Benchmarks every decode and prefill provider on every shape, appending rows to
    ``csv_path`` as they come. Returns the rows written."""
    skip = CPU_ONLY if device.type == "cuda" else GPU_ONLY
    names = providers or [p for p in (*DECODE_PROVIDERS, *PREFILL_PROVIDERS) if p not in skip]

    def prepare(shape):
        torch.manual_seed(shape.N * 131 + shape.B * 7 + shape.Hkv)
        return Context(shape, device)

    return common.run(KERNEL, device, csv_path, env, deadline, shape_list, names, prepare, bench)


def main(argv=None):
    ap = common.script_parser(__doc__, "every context of the benchmark (GPU)")
    ap.add_argument("--N", type=int, nargs="+", help="context lengths (default per device)")
    ap.add_argument("--B", type=int, nargs="+", help="batch sizes")
    ap.add_argument("--providers", nargs="+", choices=[*DECODE_PROVIDERS, *PREFILL_PROVIDERS])
    ap.add_argument("--models", nargs="+", help="attention shapes by model name (GPU: "
                    f"{', '.join(GPU_MODELS)}; CPU: {', '.join(CPU_MODELS)})")
    args = ap.parse_args(argv)
    device, env = common.start(args)
    run(device, args.results_dir / f"{KERNEL}.csv", env, common.Deadline(args.time_budget),
        shapes(device, args.full, args.N, args.B, args.tiny, args.models), args.providers)


if __name__ == "__main__":
    sys.exit(main())
