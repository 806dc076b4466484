"""``python -m sinklora.demo`` (``make demo``): SinkLoRA end to end on a tiny random Llama.

1. A few LoRA training steps with SF-Attn (LongLoRA's recipe: RoPE interpolated to the training
   length, LoRA on q/k/v/o, embeddings and norms trained), each step's loss checked against the
   same loss computed with the spec's dense-mask attention (float64).
2. Greedy generation with the default ``DynamicCache`` and with ``sinklora.H2OCache`` at full and
   at half budget: tokens/s and the bytes the cache holds.

CPU: the SF-Attn PyTorch fallback, fp32, well under 3 minutes. CUDA: the Triton kernels, bf16.
"""
import argparse
import sysconfig
import time
import warnings
from pathlib import Path

import peft
import torch
from transformers import DynamicCache, LlamaForCausalLM

from .hf import (ATTN_NAME, CACHE_ARG, REFERENCE_ATTN_NAME, H2OCache, extend_context,
                 group_size_for, lora_config, replace_llama_attn)
from .train import blocks, tiny_config, tokenize_corpus

# Relative loss difference allowed between SF-Attn and the float64 dense reference: fp32 on
# CPU only sees rounding; bf16 on GPU rounds q, k, v and the attention output to 8 bits.
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def cache_bytes(cache):
    """Bytes the cache holds: ``H2OCache.nbytes`` (keys, values, positions, scores), else the
    layers' keys and values."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if t is not None)


def train_steps(model, batches, steps, dtype):
    """LoRA steps with SF-Attn; each loss is compared with the dense reference's loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    base = model.get_base_model()
    for step in range(steps):
        ids = next(batches)
        # fork_rng: the SF-Attn forward below then draws the same LoRA dropout masks.
        devices = [ids.device] if ids.is_cuda else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            base.set_attn_implementation(REFERENCE_ATTN_NAME)
            reference = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
            base.set_attn_implementation(ATTN_NAME)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        rel = abs(loss.item() - reference) / abs(reference)
        print(f"  step {step + 1}: loss {loss.item():.5f}  dense reference {reference:.5f}  "
              f"rel diff {rel:.1e}  ({ids.numel() / seconds:,.0f} tok/s)")
        if not rel < LOSS_TOL[dtype]:
            raise SystemExit(f"SF-Attn loss differs from the dense reference by {rel:.1e} "
                             f"(> {LOSS_TOL[dtype]:.0e})")


def generate(model, prompt, new_tokens, cache):
    """Greedy generation; returns the new tokens, tokens/s and the cache's bytes."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, **{CACHE_ARG: cache}, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out[:, prompt.shape[1]:], new_tokens * prompt.shape[0] / seconds, cache_bytes(cache)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sinklora.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    p.add_argument("--steps", type=int, default=6, help="LoRA training steps")
    p.add_argument("--prompt-len", type=int, default=192, help="prompt tokens for generation")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    args = p.parse_args(argv)
    for name, value in vars(args).items():
        if value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    # peft calls transformers' deprecated is_gradient_checkpointing; not ours to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    print(f"device {device}, {dtype}; SF-Attn via "
          f"{'the Triton kernels' if cuda else 'the PyTorch fallback (no CUDA)'}")

    config = tiny_config()
    factor = extend_context(config, args.seq_len)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    replace_llama_attn(model)  # G = seq_len / 4, 4 sinks, half the heads shifted
    model = peft.get_peft_model(model, lora_config())
    print(f"tiny Llama: {config.num_hidden_layers} layers, {config.num_attention_heads} query / "
          f"{config.num_key_value_heads} kv heads, RoPE x{factor} (linear) to {args.seq_len} "
          f"tokens, SF-Attn group size {group_size_for(config.sinklora, args.seq_len)}")
    model.print_trainable_parameters()

    corpus = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    tokens = tokenize_corpus([corpus], None, config.eos_token_id)
    order = torch.Generator().manual_seed(0)
    batches = (b.to(device) for b in blocks(tokens, args.seq_len, 2, order))
    print(f"\nLoRA + SF-Attn training on {corpus.name} (bytes), batch 2 x {args.seq_len}:")
    train_steps(model, batches, args.steps, dtype)
    print("  every loss matches the dense reference")

    model.eval()
    prompt = tokens[:args.prompt_len][None].to(device)
    total = args.prompt_len + args.new_tokens
    print(f"\ngreedy generation: {args.prompt_len} prompt + {args.new_tokens} new tokens")
    dense, speed, size = generate(model, prompt, args.new_tokens, DynamicCache(config=config))
    print(f"  {'DynamicCache':<34} {speed:8.1f} tok/s  {size / 1024:8.1f} KiB")
    for name, budget in (("full", total), ("half", total // 2)):
        cache = H2OCache(heavy_budget=budget // 2, recent_budget=budget - budget // 2)
        out, speed, size = generate(model, prompt, args.new_tokens, cache)
        label = f"H2OCache {name} budget ({budget} entries)"
        same = "same tokens as DynamicCache" if torch.equal(out, dense) else (
            f"{(out == dense).float().mean().item():.0%} of tokens as DynamicCache")
        print(f"  {label:<34} {speed:8.1f} tok/s  {size / 1024:8.1f} KiB  {same}")
        if name == "full" and not torch.equal(out, dense):
            raise SystemExit("H2OCache at full budget must generate what DynamicCache does")


if __name__ == "__main__":
    main()
