"""The small byte-level Llama of the paper experiments, pretrained from scratch, and the
training / perplexity loops the experiments share.

``python -m bench.pretrain [--preset gpu|cpu|smoke]`` pretrains (or finds in the cache) and
prints the validation-loss curve; ``bench.context_extension`` and ``bench.h2o_quality`` call
``pretrained_model`` themselves, so running this first is optional.

The model is a ``LlamaForCausalLM`` built from ``LlamaConfig`` (vocabulary 256, GQA, head dim
>= 32), trained with full attention (SDPA) at context ``L`` on random windows of the stdlib
corpus (``bench.corpus``) until its validation loss flattens: evaluated every
``eval_every`` steps, training stops when the best loss of the last ``patience`` evaluations is
less than ``min_delta`` nats below the loss before them, or at ``max_steps``, or when
``time_limit_s`` has passed. The checkpoint goes to ``<cache dir>/pretrain-<key>``, ``key``
a hash of the sizes, the recipe, the seed, the corpus fingerprint and the device type; a run
with the same key loads it instead of training again.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from bench import common, paper_results
from bench import corpus as corpus_mod

INFO_FILE = "pretrain_info.json"
DEFAULT_CACHE = Path(os.environ.get("SINKLORA_BENCH_CACHE",
                                    Path.home() / ".cache" / "sinklora-bench"))


@dataclass(frozen=True)
class ModelSize:
    """Transformer sizes and the pretraining context ``L``."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    context: int


@dataclass(frozen=True)
class PretrainRecipe:
    """How the model is pretrained (see the module docstring for the stopping rule)."""

    batch: int
    max_steps: int
    lr: float
    warmup: int
    eval_every: int
    eval_windows: int
    min_delta: float
    patience: int
    time_limit_s: float
    weight_decay: float = 0.1


# ~9.6M parameters (6 layers, hidden 384, 6 query heads of dim 64 over 2 kv heads), L = 256.
GPU_SIZE = ModelSize(hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=2, context=256)
# 64 windows of 256 bytes = 16k tokens a step; 4000 steps are ~2 passes over the 30 MB corpus.
GPU_PRETRAIN = PretrainRecipe(batch=64, max_steps=4000, lr=1.5e-3, warmup=200, eval_every=250,
                              eval_windows=128, min_delta=0.01, patience=3, time_limit_s=180)
# The CPU preset, for a 2-core machine in about an hour for all three scripts: ~0.85M
# parameters (4 layers, hidden 128, 4 query heads of dim 32 over 2 kv heads), L = 128,
# 32 windows of 128 bytes = 4k tokens a step (~0.27 s a step on 2 cores).
CPU_SIZE = ModelSize(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, context=128)
CPU_PRETRAIN = PretrainRecipe(batch=32, max_steps=4000, lr=2e-3, warmup=100, eval_every=200,
                              eval_windows=64, min_delta=0.01, patience=3, time_limit_s=1500)
SMOKE_SIZE = ModelSize(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, context=64)
SMOKE_PRETRAIN = PretrainRecipe(batch=8, max_steps=30, lr=3e-3, warmup=5, eval_every=10,
                                eval_windows=8, min_delta=0.01, patience=3, time_limit_s=60)
# --preset -> (ModelSize, PretrainRecipe). "gpu" is the experiment; "cpu" a smaller one whose
# results are written apart (*_cpu files); "smoke" only checks the scripts (*_smoke files).
PRESETS = {"gpu": (GPU_SIZE, GPU_PRETRAIN), "cpu": (CPU_SIZE, CPU_PRETRAIN),
           "smoke": (SMOKE_SIZE, SMOKE_PRETRAIN)}


def model_config(size):
    """The ``LlamaConfig`` of ``size``: byte vocabulary, GQA, default RoPE, no dropout."""
    if size.hidden % size.heads or size.heads % size.kv_heads:
        raise ValueError(f"size must have hidden % heads == 0 and heads % kv_heads == 0, "
                         f"got {size}")
    if size.hidden // size.heads < 32:
        raise ValueError(f"size must have a head dim >= 32, got {size.hidden // size.heads}")
    return LlamaConfig(vocab_size=corpus_mod.VOCAB_SIZE, hidden_size=size.hidden,
                       intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                       max_position_embeddings=size.context, attention_dropout=0.0,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)


def amp_dtype(device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device):
    """The autocast context every forward of the experiments runs in."""
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def lr_at(step, total, peak, warmup):
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model, batches, *, steps, lr, warmup, weight_decay, device, on_step=None,
          log_every=50, label="train"):
    """AdamW on ``model``'s trainable parameters, one step per batch of ``batches``.

    ``on_step(step, loss)`` (1-based ``step``) runs after each step; training stops early when
    it returns True. Returns ``(steps done, last loss, tokens per second)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                            fused=device.type == "cuda")
    model.train()
    tokens, loss_value, done = 0, float("nan"), 0
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if step >= steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = batch.to(device, non_blocking=True)
        with autocast(device):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        done = step + 1
        if done % log_every == 0 or done == steps:
            loss_value = loss.item()
            rate = tokens / (time.perf_counter() - start)
            print(f"  [{label}] step {done}/{steps} loss {loss_value:.4f} "
                  f"{rate / 1e3:.1f}k tok/s", flush=True)
        if on_step is not None and on_step(done, loss):
            break
    loss_value = loss.item() if done else loss_value
    return done, loss_value, tokens / max(time.perf_counter() - start, 1e-9)


def token_nll(logits, targets):
    """NLL of ``targets`` ``[B, T]`` under ``logits`` ``[B, T, V]``, summed over the batch per
    position: ``[T]`` float64 on the logits' device (no host sync)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return nll.sum(0).double()


@torch.no_grad()
def position_nll(model, windows, batch_size, device):
    """Next-token negative log-likelihood (nats) of ``model`` over ``windows`` ``[count, N]``
    in evaluation mode (full attention for sinklora models), summed over the windows per
    predicted position: ``[N - 1]`` float64 on ``device``, entry ``i`` for token ``i + 1``."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(windows.shape[1] - 1, dtype=torch.float64, device=device)
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        with autocast(device):
            logits = model(input_ids=chunk, use_cache=False).logits
        sums += token_nll(logits[:, :-1], chunk[:, 1:])
    model.train(was_training)
    return sums


def average_nll(sums, count, start=0):
    """Mean NLL per token of the positions ``start..`` of per-position ``sums`` over ``count``
    windows; None when there are no such positions."""
    part = sums[start:]
    return float(part.sum()) / (count * part.numel()) if part.numel() else None


def mean_nll(model, windows, batch_size, device):
    """Mean next-token NLL (nats) of ``model`` over ``windows``, every position but the first
    predicted."""
    return average_nll(position_nll(model, windows, batch_size, device), windows.shape[0])


def _cache_key(size, recipe, seed, corpus, device):
    spec = {"size": dataclasses.asdict(size), "recipe": dataclasses.asdict(recipe), "seed": seed,
            "corpus": corpus.fingerprint, "device": device.type}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def load_checkpoint(path, device):
    """The fp32 model saved at ``path``, on ``device``, with SDPA attention."""
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device)


def pretrained_model(size, recipe, corpus, device, cache_dir=DEFAULT_CACHE, seed=0,
                     force=False):
    """The model of ``size`` pretrained by ``recipe`` on ``corpus``: loaded from the cache when
    a checkpoint with the same key exists (unless ``force``), else trained and saved.

    Returns ``(model, path, info)``, ``info`` the dict saved next to the checkpoint (steps,
    validation-loss curve, why training stopped, tokens/s, ...).
    """
    path = Path(cache_dir) / f"pretrain-{_cache_key(size, recipe, seed, corpus, device)}"
    info_path = path / INFO_FILE
    if info_path.exists() and not force:
        info = json.loads(info_path.read_text())
        print(f"pretrained model: loaded {path} ({info['steps']} steps, validation loss "
              f"{info['val_loss'][-1][1]:.4f} nats)", flush=True)
        return load_checkpoint(path, device), path, info

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(size)).to(device)
    model.set_attn_implementation("sdpa")
    windows = corpus_mod.validation_windows(corpus.validation, size.context, recipe.eval_windows)
    curve, stop = [], {"reason": f"max_steps {recipe.max_steps}"}
    deadline = common.Deadline(recipe.time_limit_s)

    def evaluate(step, loss):
        if deadline.passed():
            stop["reason"] = f"time limit {recipe.time_limit_s:.0f} s"
            return True
        if step % recipe.eval_every:
            return False
        curve.append((step, mean_nll(model, windows, recipe.batch, device)))
        print(f"  [pretrain] step {step} validation loss {curve[-1][1]:.4f}", flush=True)
        if len(curve) > recipe.patience:
            before = curve[-recipe.patience - 1][1]
            if before - min(v for _, v in curve[-recipe.patience:]) < recipe.min_delta:
                stop["reason"] = (f"flat: < {recipe.min_delta} nats better over the last "
                                  f"{recipe.patience} evaluations")
                return True
        return False

    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining {n_params / 1e6:.2f}M parameters at context {size.context} "
          f"on {device} -> {path}", flush=True)
    start = time.perf_counter()
    batches = corpus_mod.train_batches(corpus.train, recipe.batch, size.context,
                                       recipe.max_steps, seed)
    steps, _, rate = train(model, batches, steps=recipe.max_steps, lr=recipe.lr,
                           warmup=recipe.warmup, weight_decay=recipe.weight_decay, device=device,
                           on_step=evaluate, log_every=recipe.eval_every, label="pretrain")
    if not curve or curve[-1][0] != steps:
        curve.append((steps, mean_nll(model, windows, recipe.batch, device)))
    info = {"steps": steps, "stopped": stop["reason"], "val_loss": curve,
            "seconds": round(time.perf_counter() - start, 1), "tokens_per_s": round(rate),
            "parameters": n_params, "size": dataclasses.asdict(size),
            "recipe": dataclasses.asdict(recipe), "seed": seed, "corpus": corpus.fingerprint,
            "python": corpus.python, "device": str(device)}
    model.save_pretrained(path)
    info_path.write_text(json.dumps(info, indent=1))
    print(f"pretrained: {steps} steps ({info['stopped']}), validation loss {curve[-1][1]:.4f} "
          f"nats, {info['seconds']} s", flush=True)
    return model, path, info


def describe_pretraining(info):
    """One line about the pretrained model for result files."""
    s = info["size"]
    return (f"model: Llama, {info['parameters'] / 1e6:.2f}M parameters, {s['layers']} layers, "
            f"hidden {s['hidden']}, {s['heads']} query / {s['kv_heads']} kv heads (head dim "
            f"{s['hidden'] // s['heads']}), pretrained at context L = {s['context']} for "
            f"{info['steps']} steps ({info['stopped']}), validation loss "
            f"{info['val_loss'][-1][1]:.4f} nats")


def argument_parser(doc, results=False):
    """The ``argparse`` parser of a paper-experiment script with the options they share.

    ``doc`` (the script's docstring): its first paragraph is the description, the rest the
    epilog of ``--help``. ``results``: add ``--results-dir``.
    """
    description, _, epilog = doc.partition("\n\n")
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="gpu",
                        help="sizes of model, data and training: gpu (default; the "
                             "experiment, minutes on one GPU), cpu (a smaller model, about an "
                             "hour for all three scripts on 2 CPU cores; *_cpu result files), "
                             "smoke (checks the script; *_smoke files)")
    parser.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                        help="same as --preset smoke: tiny model, few steps, short context, "
                             "the whole script on CPU in under 2 minutes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where the pretrained checkpoint and finished runs are kept "
                             "(default: $SINKLORA_BENCH_CACHE or ~/.cache/sinklora-bench)")
    parser.add_argument("--force-pretrain", action="store_true",
                        help="pretrain again even when the cache has a matching checkpoint")
    if results:
        common.add_results_dir(parser)
    return parser


def setup_run(name, preset):
    """The ``torch.device`` named ``name``, after the process-wide settings of a run: one
    intra-op thread for a smoke run on the CPU, no weight-loading progress bars (each arm
    loads the checkpoint again). Warns when the GPU preset runs on a CPU."""
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(name)
    if device.type == "cpu" and preset == "smoke":
        # The smoke model's matrices are too small to gain from threads, and on a shared
        # machine intra-op threads that wait on each other make it tens of times slower.
        torch.set_num_threads(1)
    if device.type == "cpu" and preset == "gpu":
        print("warning: the gpu preset is meant for a GPU; on a CPU it takes hours "
              "(--preset cpu: a smaller model; --smoke: a quick check)", file=sys.stderr,
              flush=True)
    return device


@dataclass
class Experiment:
    """What every experiment script starts from (``start_experiment``)."""

    device: torch.device
    corpus: corpus_mod.Corpus
    env: dict
    size: ModelSize
    model: LlamaForCausalLM
    checkpoint: Path
    info: dict

    preset: str

    def header(self, setup):
        """The lines a result file starts with: environment, corpus, model, then ``setup``
        (what the script ran), marked with the preset when it is not the GPU one."""
        return common.describe(self.env) + [
            self.corpus.describe(), describe_pretraining(self.info),
            setup + paper_results.PRESET_MARKS[self.preset]]


def start_experiment(args):
    """The shared opening of a script parsed by ``argument_parser``: sets up the run, loads the
    corpus, prints the environment and gets the pretrained model (cached or trained)."""
    device = setup_run(args.device, args.preset)
    corpus = corpus_mod.load_corpus()
    env = common.environment(device, corpus=corpus.fingerprint)
    print("\n".join(common.describe(env)), flush=True)
    print(corpus.describe(), flush=True)
    size, recipe = PRESETS[args.preset]
    model, path, info = pretrained_model(size, recipe, corpus, device, args.cache_dir,
                                         force=args.force_pretrain)
    return Experiment(device, corpus, env, size, model, path, info, args.preset)


def main(argv=None):
    run = start_experiment(argument_parser(__doc__).parse_args(argv))
    print(describe_pretraining(run.info))
    print("validation loss curve (step, nats): "
          + ", ".join(f"({s}, {v:.4f})" for s, v in run.info["val_loss"]))
    print(f"checkpoint: {run.checkpoint}")


if __name__ == "__main__":
    main()
