"""Context extension with LoRA: how much of the gain of fine-tuning with full attention each
training attention recovers (SinkLoRA's headline claim: SF-Attn 92%, LongLoRA's S2-Attn 39%).
Every arm, ``full`` included, trains the same LoRA recipe; only the attention differs.

The byte-level Llama of ``bench.pretrain`` (pretrained with full attention at context
``L``) is extended to ``4L`` with ``sinklora.extend_context`` (linear RoPE interpolation) and
fine-tuned with ``sinklora.lora_config()`` (LongLoRA's recipe: LoRA r=8 on q/k/v/o, embeddings
and norms trained) for the same steps, on the same data in the same order, from the same seed,
in five arms that differ only in the attention used in training:

- ``full``: full causal attention (SDPA);
- ``s2``: LongLoRA's S2-Attn (``mode="s2", num_sink=0``);
- ``s2+sinks``: S2-Attn plus 4 sink tokens (``mode="s2", num_sink=4``);
- ``sf-no-sinks``: shifted groups without wrap-around, no sinks (``mode="sf", num_sink=0``);
- ``sf``: SF-Attn (``mode="sf", num_sink=4``).

Group size is LongLoRA's ``4L / 4 = L``. Every arm, the un-extended base and the base with
interpolated positions but no fine-tuning are then evaluated at ``4L`` with full attention on
validation windows. Per seed, ``recovery = (ppl_base - ppl_arm) / (ppl_base - ppl_full)``
with ``ppl_base`` the un-extended base (SinkLoRA's definition); ``recovery_vs_pi`` uses the
interpolated base instead (which of the two bases is worse depends on the model);
``above_full = ppl_arm - ppl_full`` is the gap each arm leaves, which stays informative when the
base is so poor that every arm recovers nearly all of it. Recovery is left empty when the
base is not at least ``MIN_GAIN`` (1 %) worse than ``full``: the ratio would only amplify
noise (or flip sign). Mean and sample std over the seeds every arm has finished.

Finished runs are kept in the cache directory (``--cache-dir``), keyed by the checkpoint, the
recipe and a hash of the sources (``sinklora/``, ``bench/``): a run stopped by
``--time-budget`` continues where it stopped when started again; changed code starts over.
Results: ``<results dir>/context_extension{,_cpu,_smoke}.{md,csv,png}`` (by ``--preset``).
"""
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model

from bench import common, paper_results, pretrain
from bench import corpus as corpus_mod
import sinklora

NAME = "context_extension"
# arm -> replace_llama_attn settings (None: full attention), paper's PG19 perplexity and
# recovery for Llama2-7B where it reports one.
ARMS = {
    "full": (None, None, None),
    "s2": ({"mode": "s2", "num_sink": 0}, 9.09, 0.39),
    "s2+sinks": ({"mode": "s2", "num_sink": 4}, 8.91, None),
    "sf-no-sinks": ({"mode": "sf", "num_sink": 0}, 8.86, None),
    "sf": ({"mode": "sf", "num_sink": 4}, 8.64, 0.92),
}
BASES = ("base", "base+pi")
# Recovery needs the base to be worse than ``full`` by at least this fraction of full's ppl.
MIN_GAIN = 0.01


@dataclass(frozen=True)
class ExtensionRecipe:
    """The fine-tuning at ``factor * L`` every arm shares, and its evaluation."""

    factor: int
    batch: int
    steps: int
    lr: float
    warmup: int
    eval_windows: int
    eval_batch: int
    lora_r: int = 8
    lora_alpha: int = 16


# 16 windows of 1024 bytes = 16k tokens a step, as in pretraining.
GPU_EXTENSION = ExtensionRecipe(factor=4, batch=16, steps=400, lr=5e-4, warmup=20,
                                eval_windows=128, eval_batch=16)
# 8 windows of 512 bytes = 4k tokens a step (~0.3 s a step with SF-Attn on 2 CPU cores).
CPU_EXTENSION = ExtensionRecipe(factor=4, batch=8, steps=300, lr=1e-3, warmup=20,
                                eval_windows=64, eval_batch=16)
SMOKE_EXTENSION = ExtensionRecipe(factor=4, batch=2, steps=3, lr=1e-3, warmup=1,
                                  eval_windows=4, eval_batch=4)
EXTENSIONS = {"gpu": GPU_EXTENSION, "cpu": CPU_EXTENSION, "smoke": SMOKE_EXTENSION}


def _code_hash():
    """The sources a run depends on (the package and these scripts), hashed: unlike the git
    sha, two different uncommitted edits differ, and a tree without ``.git`` has one."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(root / "sinklora").rglob("*.py"), *(root / "bench").glob("*.py")]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _run_key(checkpoint, recipe):
    spec = {"checkpoint": Path(checkpoint).name, "recipe": dataclasses.asdict(recipe),
            "code": _code_hash()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


class RunLog:
    """Finished runs (one JSON object a line), so that an interrupted experiment resumes."""

    def __init__(self, path, fresh):
        self.path = Path(path)
        self.runs = {}
        if self.path.exists() and not fresh:
            for line in self.path.read_text().splitlines():
                run = json.loads(line)
                self.runs[(run["arm"], run["seed"])] = run
        elif fresh and self.path.exists():
            self.path.unlink()

    def get(self, arm, seed):
        return self.runs.get((arm, seed))

    def add(self, run):
        self.runs[(run["arm"], run["seed"])] = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(run) + "\n")


def evaluate_base(arm, checkpoint, target, windows, recipe, device):
    """Perplexity at ``target`` of the pretrained model as is (``base``) or with interpolated
    positions (``base+pi``), without training."""
    model = pretrain.load_checkpoint(checkpoint, device)
    if arm == "base+pi":
        sinklora.extend_context(model, target)
    nll = pretrain.mean_nll(model, windows, recipe.eval_batch, device)
    return {"arm": arm, "seed": None, "nll": nll, "ppl": math.exp(nll)}


def run_arm(arm, seed, checkpoint, target, corpus, windows, recipe, device):
    """Extends, fine-tunes and evaluates one arm; returns its run record."""
    settings = ARMS[arm][0]
    model = pretrain.load_checkpoint(checkpoint, device)
    sinklora.extend_context(model, target)
    if settings is not None:  # else the checkpoint's SDPA: full attention in training too
        sinklora.replace_llama_attn(model, **settings)
    torch.manual_seed(seed)  # the LoRA initialization and dropout
    model = get_peft_model(model, sinklora.lora_config(r=recipe.lora_r, alpha=recipe.lora_alpha))
    trainable, total = model.get_nb_trainable_parameters()
    print(f"{arm} seed {seed}: {trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters "
          f"trained", flush=True)
    batches = corpus_mod.train_batches(corpus.train, recipe.batch, target, recipe.steps, seed)
    start = time.perf_counter()
    steps, loss, rate = pretrain.train(model, batches, steps=recipe.steps, lr=recipe.lr,
                                       warmup=recipe.warmup, weight_decay=0.0, device=device,
                                       log_every=max(1, recipe.steps // 4),
                                       label=f"{arm} seed {seed}")
    seconds = time.perf_counter() - start
    nll = pretrain.mean_nll(model, windows, recipe.eval_batch, device)
    return {"arm": arm, "seed": seed, "nll": nll, "ppl": math.exp(nll),
            "steps": steps, "train_loss": loss, "train_seconds": round(seconds, 1),
            "tokens_per_s": round(rate)}


def summarize(log, arms, seeds):
    """The runs of the seeds every arm (``full`` among them) has finished, each with
    ``above_full`` and, where the base is at least ``MIN_GAIN`` worse than the same seed's
    ``full``, its recoveries. A partial seed is left out, so every column of a row of the
    table averages the same seeds."""
    base = log.get("base", None)
    pi = log.get("base+pi", None)
    per_seed = []
    for seed in seeds:
        if any(log.get(arm, seed) is None for arm in (*arms, "full")):
            continue
        full = log.get("full", seed)
        for arm in arms:
            run = log.get(arm, seed)
            row = dict(run, above_full=run["ppl"] - full["ppl"])
            for key, ref in (("recovery", base), ("recovery_vs_pi", pi)):
                if ref is not None and ref["ppl"] > full["ppl"] * (1 + MIN_GAIN):
                    row[key] = (ref["ppl"] - run["ppl"]) / (ref["ppl"] - full["ppl"])
            per_seed.append(row)
    return per_seed


def _fmt(values, digits, scale=1.0):
    values = [v * scale for v in values if v is not None]
    return paper_results.fmt_spread(values, digits) if values else "n/a"


def report(log, arms, seeds, ctx, paths, env, header, preset):
    """Prints and writes the table, the CSV and the plot; returns the markdown table."""
    per_seed = summarize(log, arms, seeds)
    base, pi = log.get("base", None), log.get("base+pi", None)
    rows, summary = [], {}
    for arm in arms:
        runs = [r for r in per_seed if r["arm"] == arm]
        ppls = [r["ppl"] for r in runs]
        summary[arm] = runs
        settings, paper_ppl, paper_rec = ARMS[arm]
        rows.append([arm, "full" if settings is None else
                     f"{settings['mode']}, {settings['num_sink']} sinks",
                     _fmt(ppls, 3), _fmt([r.get("above_full") for r in runs], 3),
                     _fmt([r.get("recovery") for r in runs], 1, 100),
                     _fmt([r.get("recovery_vs_pi") for r in runs], 1, 100), len(runs),
                     "" if paper_ppl is None else f"{paper_ppl}",
                     "" if paper_rec is None else f"{paper_rec:.0%}"])
    for name, run, what in (("base", base, "none (positions beyond L)"),
                            ("base+pi", pi, "none (interpolated positions)")):
        rows.append([name, what, "n/a" if run is None else f"{run['ppl']:.3f}", "", "", "", "",
                     "", ""])
    table = common.markdown_table(
        ["arm", "training attention", f"ppl at {ctx['target']}", "ppl above full (same seed)",
         "recovery %",
         "recovery vs base+pi %", "seeds", "paper ppl (PG19, Llama2-7B)", "paper recovery"],
        rows)
    missing = [(a, s) for s in seeds for a in arms if log.get(a, s) is None]
    missing += [(b, None) for b in BASES if log.get(b, None) is None]
    status = ("complete" if not missing else
              f"INCOMPLETE: {len(missing)} runs missing "
              f"({', '.join(f'{a}/{s}' for a, s in missing)}); run again to continue")
    notes = (f"mean ± sample std over the {len({r['seed'] for r in per_seed})} seeds every "
             f"arm finished; recovery is n/a where the base is less than "
             f"{MIN_GAIN:.0%} worse than full")
    lines = header + [status, notes, table]
    print("\n" + "\n\n".join(lines[-3:]), flush=True)
    paper_results.write_markdown(
        paths["md"], "Context extension: recovery of fine-tuning with full attention", lines)
    columns = ["arm", "mode", "num_sink", "seed", "context", "target", "ppl", "nll",
               "above_full", "recovery", "recovery_vs_pi", "steps", "train_loss",
               "train_seconds", "tokens_per_s"]
    csv_rows = []
    for run in [r for r in (base, pi) if r is not None] + per_seed:
        settings = ARMS.get(run["arm"], (None,))[0]
        csv_rows.append({**{k: run.get(k) for k in columns}, **ctx,
                         "mode": settings["mode"] if settings else None,
                         "num_sink": settings["num_sink"] if settings else None})
    paper_results.write_results(paths["csv"], columns, csv_rows, env)
    _plot(summary, base, pi, ctx, paths["png"], env, preset)
    return table


def _bars(ax, arms, values, color, title):
    """Mean ± sample std of ``values[i]`` (a list per arm) as bars; arms without values get
    none."""
    stats = [paper_results.mean_std(v) if v else (0.0, None) for v in values]
    ax.bar(arms, [m for m, _ in stats], yerr=[s or 0 for _, s in stats], capsize=4, color=color)
    ax.set_title(title, fontsize=10)
    return stats


def _plot(summary, base, pi, ctx, path, env, preset):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a, runs in summary.items() if runs]
    if not arms:
        return
    fig, (ax_ppl, ax_gap, ax_rec) = plt.subplots(1, 3, figsize=(15, 4))
    bases = ", ".join(f"{name} {run['ppl']:.2f}" for name, run in (("base", base),
                                                                   ("base+pi", pi)) if run)
    stats = _bars(ax_ppl, arms, [[r["ppl"] for r in summary[a]] for a in arms], "tab:blue",
                  f"ppl at {ctx['target']} (L={ctx['context']})"
                  + (f"; not fine-tuned: {bases}" if bases else ""))
    ax_ppl.set_ylim(min(m - (s or 0) for m, s in stats) * 0.97,
                    max(m + (s or 0) for m, s in stats) * 1.03)
    ax_ppl.set_ylabel("ppl (axis not from 0)")
    _bars(ax_gap, arms, [[r["above_full"] for r in summary[a] if "above_full" in r]
                         for a in arms], "tab:orange", "ppl above the full arm (same seed)")
    _bars(ax_rec, arms, [[r["recovery"] * 100 for r in summary[a] if "recovery" in r]
                         for a in arms], "tab:green", "recovery of the full arm's gain, %")
    for ax in (ax_ppl, ax_gap, ax_rec):
        ax.tick_params(axis="x", labelsize=8)
    paper_results.save_figure(fig, path, env, preset)


def main(argv=None):
    parser = pretrain.argument_parser(__doc__, results=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="fine-tuning seeds (data order, LoRA init); default 0 1, "
                             "smoke: 0")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="arms to run (default: all five; 'full' is needed for recovery)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which no new run starts (finished runs are kept "
                             "and the next invocation continues); default: no limit")
    parser.add_argument("--fresh", action="store_true",
                        help="forget finished runs of this configuration and run all again")
    args = parser.parse_args(argv)
    smoke = args.preset == "smoke"
    seeds = args.seeds or ([0] if smoke else [0, 1])
    if len(seeds) < 2 and not smoke:
        parser.error("--seeds needs at least 2 seeds outside --smoke (mean and spread)")
    deadline = common.Deadline(args.time_budget)
    exp = pretrain.start_experiment(args)
    # Each arm loads the checkpoint afresh; the model in exp stays untouched.
    device, corpus, env, size = exp.device, exp.corpus, exp.env, exp.size
    checkpoint = exp.checkpoint
    recipe = EXTENSIONS[args.preset]
    target = size.context * recipe.factor
    windows = corpus_mod.validation_windows(corpus.validation, target, recipe.eval_windows)
    key = _run_key(checkpoint, recipe)
    log = RunLog(Path(args.cache_dir) / f"{NAME}-{key}.jsonl", args.fresh)
    todo = [(b, None) for b in BASES] + [(a, s) for s in seeds for a in args.arms]
    for arm, seed in todo:
        if log.get(arm, seed) is not None:
            continue
        if deadline.passed():
            print(f"time budget of {args.time_budget:.0f} s spent; stopping before {arm} "
                  f"seed {seed}", flush=True)
            break
        if seed is None:
            run = evaluate_base(arm, checkpoint, target, windows, recipe, device)
        else:
            run = run_arm(arm, seed, checkpoint, target, corpus, windows, recipe, device)
        log.add(run)
        print(f"{arm} seed {seed}: ppl at {target} = {run['ppl']:.4f}", flush=True)
    header = exp.header(
        f"extension: {recipe.factor}x to {target} bytes with extend_context() + lora_config() "
        f"(r={recipe.lora_r}, alpha={recipe.lora_alpha}), {recipe.steps} steps of "
        f"{recipe.batch} x {target} tokens, lr {recipe.lr} (warmup {recipe.warmup}, cosine), "
        f"group size {target // 4}, seeds {seeds}; evaluation: {recipe.eval_windows} "
        f"validation windows of {target} bytes, full attention")
    ctx = {"context": size.context, "target": target}
    report(log, args.arms, seeds, ctx, paper_results.output_paths(args.results_dir, NAME,
                                                                  args.preset), env, header,
           args.preset)


if __name__ == "__main__":
    main()
