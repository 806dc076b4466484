"""The README's Python examples run as printed, so that one drifting from the API fails here.

Each block is executed with only the substitutions listed for it: the names the README leaves
to the reader (a checkpoint path, ``input_ids``, tensors) become a tiny random Llama saved in a
temporary folder and small random inputs, the H2O example generates 1100 tokens instead of
4096 (still past its budget), on CPU the device, dtype and sizes become ones a CPU runs in
seconds, and with transformers before 5.24 ``cache=cache`` becomes ``past_key_values=cache``.
Every substitution must match (a README edit that removes one fails), and the numbers the
examples' comments state are checked.
"""
import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import sinklora
from conftest import DEVICE
from sinklora.hf import CACHE_ARG

README = Path(__file__).resolve().parents[2] / "README.md"
CPU = DEVICE == "cpu"
PROMPTS = ["The heavy hitters of a long story are", "Once upon a time"]


def blocks():
    """The README's Python examples, each preceded by newlines up to its line in the README
    (so a traceback names the README's line)."""
    text = README.read_text()
    return ["\n" * text.count("\n", 0, m.start(1)) + m.group(1)
            for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def run(block, subs, namespace):
    """Executes ``block`` after replacing each ``(old, new)`` of ``subs`` (all must occur)."""
    for old, new in subs:
        assert old in block, f"README example no longer contains {old!r}:\n{block.strip()}"
        block = block.replace(old, new)
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def on_cpu(*subs):
    return list(subs) if CPU else []


OLD_CACHE_NAME = [] if CACHE_ARG == "cache" else [("cache=cache", f"{CACHE_ARG}=cache")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama (GQA 4:2, 4096 positions as Llama 2, no EOS so generation runs its
    full length) and a word-level tokenizer for the README's prompts."""
    path = tmp_path_factory.mktemp("llama")
    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>"] + words)}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(path)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                         pad_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_readme_has_the_examples_this_file_runs():
    assert len(blocks()) == 6


def test_sf_attention_example():
    ns = run(blocks()[0], on_cpu(('device="cuda"', 'device="cpu"'),
                                 ("torch.bfloat16", "torch.float32"), ("8192", "512")), {})
    o, q, k = ns["o"], ns["q"], ns["k"]
    assert o.shape == q.shape and torch.isfinite(o).all()
    assert q.grad is not None and k.grad.shape == k.shape and torch.isfinite(k.grad).all()


def test_replace_llama_attn_and_lora_recipe_examples(checkpoint):
    input_ids = torch.randint(2, 256, (1, 64))
    ns = run(blocks()[1], [('"path/to/llama"', repr(str(checkpoint)))] + OLD_CACHE_NAME,
             {"input_ids": input_ids})
    model = ns["model"]
    assert model.config._attn_implementation == "sinklora"
    assert all(p.grad is not None for p in model.model.layers[0].self_attn.parameters())
    assert ns["cache"].get_seq_length() == 64 + 64 - 1
    # The recipe, on the same model: "factor ceil(32768 / 4096) = 8".
    ns = run(blocks()[2], [], ns)
    assert ns["model"].config.rope_parameters["factor"] == 8
    trainable = {n for n, p in ns["model"].named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("embed_tokens" in n for n in trainable)


def test_reload_example(tmp_path):
    from sinklora import train

    out = tmp_path / "runs" / "llama-8k"
    train.main(["--tiny", "--data", str(Path(__file__).with_name("hf_helpers.py")), "--pattern",
                "*.py", "--output-dir", str(out), "--seq-len", "64", "--batch-size", "1",
                "--steps", "1", "--no-gradient-checkpointing"])
    ns = run(blocks()[3], [('"runs/llama-8k"', repr(str(out))),
                           ('"path/to/llama"', repr(str(out / "base_model")))], {})
    assert ns["base"].config._attn_implementation == "sinklora"
    saved = json.loads((out / "config.json").read_text())
    assert ns["base"].config.sinklora == saved["sinklora"]  # the trainer's SF-Attn settings
    assert ns["base"].config.rope_parameters == saved["rope_parameters"]
    assert ns["model"].peft_config["default"].r == 8


def test_h2o_cache_example(checkpoint):
    # Fewer new tokens than the README's 4096, still more than the budget of 1028 entries.
    new = 1100
    ns = run(blocks()[4], [("max_new_tokens=4096", f"max_new_tokens={new}")] + OLD_CACHE_NAME
             + on_cpu((".cuda()", ""), ('.to("cuda")', '.to("cpu")'),
                      ("torch.bfloat16", "torch.float32")),
             {"path": str(checkpoint)})
    layer, cache, out, batch = ns["layer"], ns["cache"], ns["out"], ns["batch"]
    prompt = batch["input_ids"].shape[1]
    assert out.shape == (2, prompt + new)  # no early stop: the model has no EOS
    assert layer.positions.shape == (2, 2, 1028) and layer.scores.dtype == torch.float32
    assert cache.get_seq_length() == prompt + new - 1  # the last token is never fed back
    # The newest token is always kept; positions count real tokens; the pads left first.
    pads = (~batch["attention_mask"].bool()).sum(1)
    assert layer.positions.amax((1, 2)).tolist() == (prompt + new - 2 - pads).tolist()
    assert pads[1] > 0 and (layer.positions >= 0).all()


def test_functional_h2o_example():
    b, hq, hkv, n, d = 2, 4, 2, 200, 16
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, :30] = False  # a left-padded sequence
    ns = {"mask": mask, "q": torch.randn(b, hq, n, d), "k": torch.randn(b, hkv, n, d),
          "v": torch.randn(b, hkv, n, d), "q_new": torch.randn(b, hq, d),
          "k_new": torch.randn(b, hkv, d), "v_new": torch.randn(b, hkv, d)}
    ns = run(blocks()[5], [], ns)
    state = ns["state"]
    assert state.positions.shape == (b, hkv, 64 + 64 + 4)
    assert state.next_position.tolist() == [n + 1, n - 30 + 1]
    assert isinstance(state, sinklora.H2OState)
