"""``python -m sinklora.train``: LongLoRA-style context extension with SF-Attn + LoRA.

Fine-tunes a Llama-architecture causal LM (a local checkpoint, or ``--tiny``: a small random
one with byte tokens) on plain-text files: the texts are tokenized, joined with EOS and cut into
``--seq-len`` blocks (LongLoRA's ``group_texts``), RoPE is interpolated linearly to
``--seq-len`` (``extend_context``), attention is SF-Attn (``replace_llama_attn``) and the
trainable parameters are LongLoRA's (``lora_config``: LoRA on q/k/v/o, embeddings and norms in
full). Saves the adapter with ``save_pretrained``.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import peft
import torch
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM)

from .hf import extend_context, group_size_for, lora_config, replace_llama_attn, sf_settings

BYTE_EOS = 256  # --tiny tokens: the 256 byte values, then EOS


def tiny_config(**overrides):
    """A small Llama config for byte tokens (GQA 4:2, 2 layers, 256 original positions)."""
    config = dict(vocab_size=BYTE_EOS + 1, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=None, eos_token_id=BYTE_EOS,
                  pad_token_id=None, initializer_range=0.05)
    config.update(overrides)
    return LlamaConfig(**config)


def parse_args(argv=None):
    """The command line ``argv`` (default ``sys.argv[1:]``), checked: a bad flag exits with
    status 2 and an error naming it, before any model is built or file written."""
    p = argparse.ArgumentParser(
        prog="python -m sinklora.train",
        description="Extend a Llama-architecture model's context with LoRA and SF-Attn "
                    "(SinkLoRA), LongLoRA's recipe: linear RoPE interpolation to --seq-len, "
                    "LoRA on q/k/v/o, embeddings and norms trained in full.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path,
                     help="local directory of a transformers Llama-architecture checkpoint "
                          "(its tokenizer is used)")
    src.add_argument("--tiny", action="store_true",
                     help="train a small random Llama on byte tokens instead (for a quick run "
                          "on CPU)")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="plain-text files and/or directories (searched recursively with "
                        "--pattern)")
    p.add_argument("--pattern", default="*.txt",
                   help="file name pattern used inside --data directories")
    p.add_argument("--output-dir", type=Path, required=True,
                   help="where the adapter (adapter_config.json, adapter_model.safetensors), the "
                        "extended base config, the tokenizer and the run's arguments are saved "
                        "(with --tiny also the random base model, in base_model/), all at once "
                        "when training ends; a non-empty one needs --overwrite-output-dir")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="replace what a non-empty --output-dir holds (at the end of the run)")
    p.add_argument("--seq-len", type=int, default=8192,
                   help="tokens per training sequence; RoPE is interpolated to cover it")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches accumulated per optimizer step")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-5,
                   help="peak AdamW learning rate (LongLoRA), > 0")
    p.add_argument("--warmup-steps", type=int, default=20,
                   help="linear warmup steps, then constant (LongLoRA)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, >= 0")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping: the global gradient norm is scaled down to at most "
                        "this, > 0; inf disables clipping")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank, >= 1")
    p.add_argument("--lora-alpha", type=float, default=16,
                   help="LoRA alpha (updates are scaled by alpha / r), > 0")
    p.add_argument("--group-size-ratio", type=float, default=0.25,
                   help="SF-Attn group size as a fraction of --seq-len")
    p.add_argument("--group-size", type=int, default=None,
                   help="fixed SF-Attn group size (even), instead of the ratio")
    p.add_argument("--num-sink", type=int, default=4, help="SF-Attn sink tokens")
    p.add_argument("--mode", choices=("sf", "s2"), default="sf",
                   help="sf: SinkLoRA's SF-Attn; s2: LongLoRA's S2-Attn (for comparison; "
                        "--seq-len must be a multiple of the group size)")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep activations instead of recomputing them (faster, more memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (cpu, cuda, cuda:1, ...); on CUDA the base model is bf16 "
                        "and the SF-Attn kernels run, on CPU everything is fp32 and SF-Attn uses "
                        "the PyTorch fallback")
    p.add_argument("--seed", type=int, default=0, help="random seed (model init, batch order)")
    args = p.parse_args(argv)
    for name in ("batch_size", "grad_accum", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        p.error(f"--seq-len must be >= 2 (each token is trained to predict the next one), got "
                f"{args.seq_len}")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    # Checked here rather than left to torch: a negative clipping norm flips the gradients'
    # sign (training climbs the loss) and 0 zeroes them, both without an error. NaN fails
    # every comparison, so "not x > 0" rejects it too.
    if not args.lr > 0 or math.isinf(args.lr):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not args.weight_decay >= 0 or math.isinf(args.weight_decay):
        p.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not args.max_grad_norm > 0:
        p.error(f"--max-grad-norm must be > 0 (inf disables clipping), got {args.max_grad_norm}")
    # lora_config and sf_settings are the places that know valid values; one flag per call so
    # the error names the flag that is wrong.
    for flag, check, kwargs in (
            ("--lora-r", lora_config, {"r": args.lora_r}),
            ("--lora-alpha", lora_config, {"alpha": args.lora_alpha}),
            ("--group-size-ratio", sf_settings, {"group_size_ratio": args.group_size_ratio}),
            ("--group-size", sf_settings, {"group_size": args.group_size}),
            ("--num-sink", sf_settings, {"num_sink": args.num_sink})):
        try:
            check(**kwargs)
        except (TypeError, ValueError) as e:
            p.error(f"{flag}: {e}")
    settings = sf_settings(args.group_size_ratio, args.group_size, args.num_sink, args.mode)
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError, ValueError) as e:
        p.error(f"--device: {e}")
    if device.type == "meta" or (device.type == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: "
                f"{'meta tensors hold no data' if device.type == 'meta' else 'no CUDA GPU here'}")
    if args.model is not None and not args.model.is_dir():
        p.error(f"--model: no such directory: {args.model} (a local checkpoint; hub names are "
                f"not downloaded)")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        p.error(f"--output-dir: {args.output_dir} exists and is not a directory")
    if (args.output_dir.is_dir() and any(args.output_dir.iterdir())
            and not args.overwrite_output_dir):
        p.error(f"--output-dir: {args.output_dir} is not empty; pass --overwrite-output-dir to "
                f"replace its contents")
    # Every training batch is exactly --seq-len tokens, unpadded, so this is the group size the
    # attention will use; S2-Attn would otherwise fail on the first forward, after the model
    # is built (and, with --tiny, base_model/ written).
    group_size = group_size_for(settings, args.seq_len)
    if args.mode == "s2" and args.seq_len % group_size:
        p.error(f"--mode s2 needs --seq-len ({args.seq_len}) to be a multiple of the group size "
                f"({group_size}, from --group-size / --group-size-ratio), as LongLoRA does; use "
                f"--mode sf for any length")
    try:
        corpus_files(args.data, args.pattern)
    except FileNotFoundError as e:
        p.error(str(e))
    return args


def corpus_files(paths, pattern):
    """The files named, and the files under the directories named that match ``pattern``."""
    files = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob(pattern) if f.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--data: no such file or directory: {path}")
    if not files:
        raise FileNotFoundError(f"--data: no files matching {pattern!r} in {list(map(str, paths))}")
    return files


def tokenize_corpus(files, tokenizer, eos_id):
    """All files' tokens, each document followed by EOS, as one 1-D LongTensor."""
    ids = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        ids.extend(list(text.encode("utf-8")) if tokenizer is None
                   else tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def blocks(tokens, seq_len, batch_size, generator):
    """Endless random batches ``[batch_size, seq_len]`` of whole blocks, reshuffled each epoch.
    A corpus too short for one batch raises here, before the first batch is asked for."""
    num = tokens.numel() // seq_len
    if num < batch_size:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than --batch-size x "
                         f"--seq-len = {batch_size * seq_len}; add text or shorten --seq-len")
    table = tokens[:num * seq_len].view(num, seq_len)

    def batches():
        while True:
            order = torch.randperm(num, generator=generator)
            for i in range(0, num - batch_size + 1, batch_size):
                yield table[order[i:i + batch_size]]

    return batches()


def load_base(args):
    """The base config with RoPE extended to ``--seq-len``, its tokenizer (None for --tiny)
    and the EOS id that separates documents."""
    if args.tiny:
        config, tokenizer = tiny_config(), None
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        config = AutoConfig.from_pretrained(args.model)
    extend_context(config, args.seq_len)
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ValueError("the model config has no eos_token_id to separate documents")
    return config, tokenizer, eos


def build_model(args, config):
    """The model (random for --tiny, else the checkpoint's weights) with SF-Attn."""
    cuda = torch.device(args.device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.tiny:
        model = LlamaForCausalLM(config).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, config=config, dtype=dtype)
    replace_llama_attn(model, group_size_ratio=args.group_size_ratio, group_size=args.group_size,
                       num_sink=args.num_sink, mode=args.mode)
    return model.to(args.device)


def enable_checkpointing(model):
    """Activation (gradient) checkpointing, non-reentrant, under either transformers 5 name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _fail(message):
    """A bad input found after parsing: the parser's one-line error and exit status 2."""
    print(f"python -m sinklora.train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _work_dir(output_dir):
    """A fresh folder beside ``output_dir`` that the run writes into, made before anything is
    built: an unwritable ``--output-dir`` fails here, not after training."""
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        if output_dir.exists() and not os.access(output_dir, os.W_OK):
            raise PermissionError(f"{output_dir} is not writable")
        return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    except OSError as e:
        _fail(f"--output-dir: cannot write {output_dir}: {e}")


def _move_into_place(work, output_dir):
    """The finished run's folder becomes ``output_dir`` (what was there goes only now)."""
    old = work.with_name(work.name + ".old")
    if output_dir.exists():
        output_dir.rename(old)
    work.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def train(args):
    """Runs the fine-tuning described by ``args``; returns the output directory. Everything
    is written into a temporary folder beside it and moved into place when training ends, so
    an interrupted or failed run leaves ``--output-dir`` as it was, never a base model and an
    adapter of two runs."""
    # peft calls transformers' deprecated is_gradient_checkpointing; not ours to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    torch.manual_seed(args.seed)
    work = _work_dir(args.output_dir)
    try:
        _train(args, work)
        _move_into_place(work, args.output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return args.output_dir


def _train(args, out):
    # The corpus is read and cut first: too little text fails before a model is built.
    config, tokenizer, eos = load_base(args)
    tokens = tokenize_corpus(corpus_files(args.data, args.pattern), tokenizer, eos)
    try:
        batches = blocks(tokens, args.seq_len, args.batch_size,
                         torch.Generator().manual_seed(args.seed))
    except ValueError as e:
        _fail(f"--data: {e}")
    model = build_model(args, config)
    if args.tiny:  # random weights: keep them, or the adapter could never be used again
        model.save_pretrained(out / "base_model")
    if not args.no_gradient_checkpointing:
        enable_checkpointing(model)
    model = peft.get_peft_model(model, lora_config(r=args.lora_r, alpha=args.lora_alpha,
                                                   model=model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # fp32 master copies; the frozen base stays bf16 on GPU
        p.data = p.data.float()
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (args.warmup_steps + 1)))
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")

    model.train()
    seen, start = 0, time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for _ in bar:
        total = 0.0
        for _ in range(args.grad_accum):
            ids = next(batches).to(args.device)
            with autocast:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
            seen += ids.numel()
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total}; lower --lr")
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{seen / (time.perf_counter() - start):.0f}")

    model.save_pretrained(out)
    model.get_base_model().config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    run = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run["data"] = [str(d) for d in args.data]
    (out / "sinklora_train.json").write_text(json.dumps(run, indent=2))
    print(f"final loss {total:.4f}; adapter saved to {args.output_dir}")


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
