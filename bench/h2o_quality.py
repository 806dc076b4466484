"""H2O KV-cache quality: streaming next-token perplexity as the cache budget shrinks
(the SinkLoRA / H2O claim: quality holds at half the KV budget).

The pretrained byte-level Llama of ``bench.pretrain`` (context ``L``) reads validation
windows of ``L`` bytes token by token through a ``sinklora.H2OCache``: the first ``budget``
tokens in one prefill (nothing is evicted while the cache holds at most its budget, so this
equals feeding them one at a time), then one token per forward, each predicting the next, the
cache evicting one entry per step. Budgets are 100 / 50 / 20 / 10 % of ``L``. Policies, all
``H2OCache`` at the same total budget ``b``:

- ``h2o``: H2O as its paper runs it, half heavy hitters, half recent tokens, no sinks;
- ``h2o+sinks``: 4 sink tokens, the rest split as in ``h2o`` (H2O plus StreamingLLM's sinks);
- ``streamingllm``: 4 sinks + the ``b - 4`` most recent tokens (``heavy_budget=0``);
- ``recent``: the ``b`` most recent tokens only.

Keys keep the rotary position they were written with (StreamingLLM instead re-numbers the
positions inside its cache; with documents no longer than ``L`` every position here is one the
model was trained on). The windows are exactly ``L`` long, not "long documents":
the model has only seen positions below ``L``, and the cache, not the model, is under test.
The ``full cache`` row is the same windows through one ordinary forward; at 100 % every policy
must equal it, and so must the decode path alone (the windows fed one token at a time from a
one-token prefill, as at 100 % nothing else decodes), which the run checks. After each
configuration the run also checks that every layer stores exactly ``min(b, tokens seen)``
entries including the sinks and the recent window. A decode step's query attends to the
``b`` stored entries plus its own token (``b + 1`` keys) before one entry leaves, so eviction
first changes the prediction of token ``b + 2``. Perplexity is given over all predicted tokens
and over the tokens ``b + 2 .. L - 1`` only, next to the full cache's on the same tokens.
Results: ``<results dir>/h2o_quality{,_cpu,_smoke}.{md,csv,png}`` (by ``--preset``).
"""
import math
import time

import torch

from bench import common, paper_results, pretrain
from bench import corpus as corpus_mod
import sinklora
from sinklora.hf import CACHE_ARG

NAME = "h2o_quality"
BUDGET_PERCENTS = (100, 50, 20, 10)
SINKS = 4
POLICIES = ("h2o", "h2o+sinks", "streamingllm", "recent")
# Relative ppl difference allowed between the 100 % budget and the full-cache forward: bf16
# autocast on GPU runs decode and SDPA with different rounding; fp32 only differs in order.
FULL_BUDGET_TOLERANCE = {torch.bfloat16: 2e-2, None: 1e-4}
# --preset -> (validation windows, windows streamed together)
DOCS = {"gpu": (64, 64), "cpu": (64, 32), "smoke": (4, 4)}


def budget_split(policy, budget):
    """``(heavy_budget, recent_budget, num_sink)`` of ``policy`` at total ``budget``."""
    sinks = SINKS if policy in ("h2o+sinks", "streamingllm") else 0
    if budget <= sinks:
        raise ValueError(f"budget must exceed the {sinks} sinks of {policy}, got {budget}")
    rest = budget - sinks
    if policy in ("h2o", "h2o+sinks"):
        return rest // 2, rest - rest // 2, sinks
    if policy in ("streamingllm", "recent"):
        return 0, rest, sinks
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def _check_kept(cache, seen):
    """Raises unless every layer stores ``min(budget, seen)`` entries per sequence and head,
    the sinks and the recent window among them."""
    b = cache.budget
    expected = min(b.total, seen)
    must = torch.cat([torch.arange(min(b.num_sink, seen)),
                      torch.arange(max(0, seen - b.recent_budget), seen)]).unique()
    for layer in cache.layers:
        positions = layer.positions
        if positions.shape[-1] != expected:
            raise RuntimeError(f"{cache!r}: layer {layer.layer_idx} stores "
                               f"{positions.shape[-1]} entries, expected {expected}")
        present = (positions[..., None] == must.to(positions.device)).any(dim=-2)
        if not bool(present.all()):
            raise RuntimeError(f"{cache!r}: layer {layer.layer_idx} lost a protected "
                               f"entry (sinks or recent window)")


@torch.no_grad()
def streaming_position_nll(model, windows, batch_size, split, device, prefill=None):
    """As ``pretrain.position_nll`` (per predicted position, summed over the windows), with
    the windows streamed through an ``H2OCache`` of ``split = (heavy_budget, recent_budget,
    num_sink)``: ``prefill`` tokens (default: the budget) in one forward, then one at a
    time."""
    prefill = sum(split) if prefill is None else prefill
    sums = torch.zeros(windows.shape[1] - 1, dtype=torch.float64, device=device)
    model.eval()
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        cache = sinklora.H2OCache(heavy_budget=split[0], recent_budget=split[1],
                                  num_sink=split[2])
        length = chunk.shape[1]
        prefix = min(prefill, length)
        with pretrain.autocast(device):
            logits = model(input_ids=chunk[:, :prefix], **{CACHE_ARG: cache},
                           use_cache=True).logits
        sums[:prefix - 1] += pretrain.token_nll(logits[:, :-1], chunk[:, 1:prefix])
        last = logits[:, -1:]
        for t in range(prefix, length):
            sums[t - 1:t] += pretrain.token_nll(last, chunk[:, t:t + 1])
            if t + 1 < length:
                with pretrain.autocast(device):
                    last = model(input_ids=chunk[:, t:t + 1], **{CACHE_ARG: cache},
                                 use_cache=True).logits[:, -1:]
        _check_kept(cache, length - 1 if prefix < length else length)
    return sums


def first_evicted(budget):
    """Index in ``position_nll``'s sums of the first prediction eviction can change: token
    ``budget + 2`` (sums[i] predicts token i + 1)."""
    return budget + 1


def _exp(nll):
    return None if nll is None else math.exp(nll)


def measure(model, windows, batch_size, context, device):
    """Rows for every policy and budget, plus the ``full cache`` row: ``nll``/``ppl`` over all
    predicted tokens, and ``nll_after_eviction``/``ppl_after_eviction`` over the tokens
    whose prediction an eviction can change (``budget + 2 .. L - 1``; up to token
    ``budget + 1`` the cache still holds everything) next to the full cache's on the same
    tokens (``full_nll_after_eviction``/``full_ppl_after_eviction``)."""
    count = windows.shape[0]
    full = pretrain.position_nll(model, windows, batch_size, device)
    full_nll = pretrain.average_nll(full, count)
    rows = [{"policy": "full cache", "budget_pct": 100, "budget": context, "nll": full_nll,
             "ppl": math.exp(full_nll)}]
    print(f"full cache: ppl {rows[0]['ppl']:.4f}", flush=True)
    for pct in BUDGET_PERCENTS:
        budget = max(1, round(context * pct / 100))
        full_after = pretrain.average_nll(full, count, first_evicted(budget))
        for policy in POLICIES:
            split = budget_split(policy, budget)
            start = time.perf_counter()
            sums = streaming_position_nll(model, windows, batch_size, split, device)
            nll = pretrain.average_nll(sums, count)
            after = pretrain.average_nll(sums, count, first_evicted(budget))
            rows.append({"policy": policy, "budget_pct": pct, "budget": budget,
                         "heavy": split[0], "recent": split[1], "sinks": split[2], "nll": nll,
                         "ppl": math.exp(nll), "nll_after_eviction": after,
                         "ppl_after_eviction": _exp(after),
                         "full_nll_after_eviction": full_after,
                         "full_ppl_after_eviction": _exp(full_after),
                         "seconds": round(time.perf_counter() - start, 1)})
            after_text = ("" if after is None else
                          f", after eviction {math.exp(after):.4f} (full cache "
                          f"{math.exp(full_after):.4f})")
            print(f"{policy:>13} budget {pct:3d}% ({budget:4d} tokens, heavy {split[0]}, "
                  f"recent {split[1]}, sinks {split[2]}): ppl {rows[-1]['ppl']:.4f}"
                  f"{after_text} ({rows[-1]['seconds']} s)", flush=True)
    return rows


def full_budget_check(rows, decoded_ppl, device):
    """A line saying whether the 100 % rows and ``decoded_ppl`` (the decode path at 100 %)
    equal the full-cache forward (within the dtype's tolerance); a mismatch is stated, never
    hidden."""
    full = rows[0]["ppl"]
    tol = FULL_BUDGET_TOLERANCE[pretrain.amp_dtype(device)]
    worst = max(abs(ppl - full) / full for ppl in
                [r["ppl"] for r in rows[1:] if r["budget_pct"] == 100] + [decoded_ppl])
    verdict = "OK" if worst <= tol else "MISMATCH: the H2O path disagrees with full attention"
    return worst, (f"check: at 100 % budget every policy's ppl, and the ppl of the windows "
                   f"decoded one token at a time, are within {worst:.2e} (relative) of the "
                   f"full-cache forward; tolerance {tol:.0e}: {verdict}")


def _cell(ppl, reference):
    return f"{ppl:.3f} ({(ppl / reference - 1) * 100:+.1f}%)"


def report(rows, context, paths, env, header, preset):
    """Prints and writes the tables, the CSV and the plot; returns the markdown tables."""
    full = rows[0]
    all_rows, after_rows = [], []
    for pct in BUDGET_PERCENTS:
        cells = {r["policy"]: r for r in rows[1:] if r["budget_pct"] == pct}
        first = next(iter(cells.values()))
        label = f"{pct}% ({first['budget']})"
        all_rows.append([label] + [_cell(cells[p]["ppl"], full["ppl"]) for p in POLICIES])
        if first["ppl_after_eviction"] is not None:
            after_rows.append([label, f"{first['full_ppl_after_eviction']:.3f}"] + [
                _cell(cells[p]["ppl_after_eviction"], first["full_ppl_after_eviction"])
                for p in POLICIES])
    tables = [
        "All predicted tokens (1 .. L-1; those up to budget+1 see an un-evicted cache):",
        common.markdown_table(
            [f"budget of L={context}"] + [f"{p} ppl (vs full)" for p in POLICIES], all_rows),
        "Only the tokens an eviction can change (budget+2 .. L-1: a step attends to the "
        "budget's entries plus its own token, then one leaves), against the full cache on the "
        "same tokens:",
        common.markdown_table(
            [f"budget of L={context}", "full cache ppl"]
            + [f"{p} ppl (vs full)" for p in POLICIES], after_rows)]
    lines = header + [f"full cache ppl: {full['ppl']:.4f}"] + tables
    print("\n" + "\n\n".join(lines[-5:]), flush=True)
    paper_results.write_markdown(paths["md"], "H2O: streaming perplexity against KV budget",
                                 lines)
    columns = ["policy", "budget_pct", "budget", "heavy", "recent", "sinks", "context", "ppl",
               "nll", "ppl_after_eviction", "nll_after_eviction", "full_ppl_after_eviction",
               "full_nll_after_eviction", "seconds"]
    paper_results.write_results(paths["csv"], columns, [{**r, "context": context} for r in rows],
                            env)
    _plot(rows, context, paths["png"], env, preset)
    return "\n\n".join(tables)


def _plot(rows, context, path, env, preset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_all, ax_after) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in POLICIES:
        mine = sorted((r["budget_pct"], r) for r in rows if r["policy"] == policy)
        ax_all.plot([p for p, _ in mine], [r["ppl"] for _, r in mine], marker="o",
                    label=policy)
        evicted = [(p, r) for p, r in mine if r["ppl_after_eviction"] is not None]
        ax_after.plot([p for p, _ in evicted],
                      [(r["ppl_after_eviction"] / r["full_ppl_after_eviction"] - 1) * 100
                       for _, r in evicted], marker="o", label=policy)
    ax_all.axhline(rows[0]["ppl"], ls="--", color="gray", label="full cache")
    ax_all.set_ylabel("streaming perplexity (bytes), all tokens")
    ax_after.axhline(0, ls="--", color="gray")
    ax_after.set_ylabel("ppl after the first eviction, % above full cache")
    for ax in (ax_all, ax_after):
        ax.set_xscale("log")
        ax.set_xticks(BUDGET_PERCENTS, [f"{p}%" for p in BUDGET_PERCENTS])
        ax.set_xlabel(f"KV budget (% of L={context})")
        ax.legend()
    paper_results.save_figure(fig, path, env, preset)


def main(argv=None):
    parser = pretrain.argument_parser(__doc__, results=True)
    parser.add_argument("--docs", type=int, default=None,
                        help="validation windows of L bytes (default by preset: "
                             + ", ".join(f"{k} {v[0]}" for k, v in DOCS.items()) + ")")
    parser.add_argument("--batch", type=int, default=None,
                        help="windows streamed together (default by preset: "
                             + ", ".join(f"{k} {v[1]}" for k, v in DOCS.items()) + ")")
    args = parser.parse_args(argv)
    default_docs, default_batch = DOCS[args.preset]
    docs = default_docs if args.docs is None else args.docs
    batch = default_batch if args.batch is None else args.batch
    if docs < 1 or batch < 1:
        parser.error(f"--docs and --batch must be >= 1, got {docs}, {batch}")
    exp = pretrain.start_experiment(args)
    device, corpus, env, size, model = exp.device, exp.corpus, exp.env, exp.size, exp.model
    model.set_attn_implementation("sinklora")
    windows = corpus_mod.validation_windows(corpus.validation, size.context, docs)
    rows = measure(model, windows, batch, size.context, device)
    decoded = streaming_position_nll(model, windows, batch, budget_split("h2o", size.context),
                                     device, prefill=1)
    _, check = full_budget_check(
        rows, math.exp(pretrain.average_nll(decoded, windows.shape[0])), device)
    header = exp.header(
        f"streaming: {docs} validation windows of L = {size.context} bytes, {batch} at a "
        f"time, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; policies at each "
        f"budget b: h2o = b/2 heavy + b/2 recent; h2o+sinks = {SINKS} sinks + (b-{SINKS})/2 "
        f"heavy + rest recent; streamingllm = {SINKS} sinks + b-{SINKS} recent; recent = b "
        f"recent") + [check]
    report(rows, size.context, paper_results.output_paths(args.results_dir, NAME, args.preset),
           env, header, args.preset)


if __name__ == "__main__":
    main()
