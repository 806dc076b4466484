"""``python -m sinklora.train``: a couple of steps of the tiny model on a text file save a usable
adapter; the corpus pieces and the command line are checked."""
import json
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from sinklora import train

TEXT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"


def test_train_tiny_saves_adapter(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sinklora.train", "--tiny", "--data", str(TEXT),
           "--output-dir", str(out), "--seq-len", "64", "--batch-size", "2", "--steps", "1",
           "--lr", "1e-3", "--warmup-steps", "0", "--group-size", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loss=" in run.stderr and "tok_s=" in run.stderr  # the tqdm bar
    assert "adapter saved" in run.stdout
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [t for n, t in weights.items() if "lora_B" in n]
    # B starts at 0; one step at the full learning rate (no warmup) moves it.
    assert len(lora_b) == 8 and all(t.abs().sum() > 0 for t in lora_b)
    assert any("embed_tokens" in n for n in weights) and any("norm" in n for n in weights)
    saved = json.loads((out / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "default"  # 64 <= the tiny model's 256
    assert saved["sinklora"]["group_size"] == 8

    base = LlamaForCausalLM.from_pretrained(out / "base_model")
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 257, (1, 16))).logits
    assert torch.isfinite(logits).all()


def test_train_local_checkpoint_with_its_tokenizer(tmp_path):
    """--model: a saved Llama checkpoint and its tokenizer (a small byte-level BPE here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT.read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    checkpoint, out = tmp_path / "llama", tmp_path / "run"
    tokenizer.save_pretrained(checkpoint)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=32,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id)).save_pretrained(checkpoint)
    train.main(["--model", str(checkpoint), "--data", str(TEXT), "--output-dir", str(out),
                "--seq-len", "100", "--batch-size", "2", "--steps", "2", "--lr", "1e-3",
                "--no-gradient-checkpointing"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear"
    assert saved["rope_parameters"]["factor"] == 4.0  # ceil(100 / 32)
    assert saved["max_position_embeddings"] == 32  # LongLoRA's convention: the base's context
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--help"])
    assert exc.value.code == 0
    parser_help = capsys.readouterr().out
    for flag in ("--model", "--tiny", "--data", "--pattern", "--output-dir", "--seq-len",
                 "--batch-size", "--grad-accum", "--steps", "--lr", "--warmup-steps",
                 "--weight-decay", "--max-grad-norm", "--lora-r", "--lora-alpha",
                 "--group-size-ratio", "--group-size", "--num-sink", "--mode",
                 "--no-gradient-checkpointing", "--device", "--seed"):
        assert flag in parser_help
    assert parser_help.count("(default:") >= 15


@pytest.mark.parametrize("argv, message", [
    (["--data", "x", "--output-dir", "o"], "--model --tiny"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--seq-len", "0"], "--seq-len"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--seq-len", "1"],
     "--seq-len must be >= 2"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--batch-size", "0"], "--batch-size"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--grad-accum", "0"], "--grad-accum"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--steps", "0"], "--steps"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--warmup-steps", "-1"],
     "--warmup-steps must be >= 0"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--group-size", "7"], "--group-size: "),
    (["--tiny", "--data", "x", "--output-dir", "o", "--num-sink", "-1"], "--num-sink: "),
    (["--tiny", "--data", "x", "--output-dir", "o", "--group-size-ratio", "0"],
     "--group-size-ratio: "),
    (["--tiny", "--data", "x", "--output-dir", "o", "--device", "meta"], "--device meta"),
    pytest.param(["--tiny", "--data", "x", "--output-dir", "o", "--device", "cuda"],
                 "--device cuda: no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a CUDA GPU")),
    (["--model", "/nonexistent/llama", "--data", "x", "--output-dir", "o"],
     "--model: no such directory"),
    (["--tiny", "--data", str(TEXT), "--output-dir", str(TEXT)], "is not a directory"),
    (["--tiny", "--data", "/nonexistent/corpus", "--output-dir", "o"],
     "--data: no such file or directory"),
    (["--tiny", "--data", str(TEXT.parent / "json"), "--output-dir", "o"],
     "--data: no files matching '*.txt'"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--mode", "s3"], "--mode"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--max-grad-norm", "0"], "--max-grad-norm"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--max-grad-norm", "nan"], "--max-grad-norm"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--lr", "0"], "--lr"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--lr", "-1e-4"], "--lr"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--lr", "inf"], "--lr"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--weight-decay", "-0.1"], "--weight-decay"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--weight-decay", "nan"], "--weight-decay"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--lora-r", "0"], "--lora-r"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--lora-alpha", "-16"], "--lora-alpha"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--lora-alpha", "inf"], "--lora-alpha"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--device", "gpu"], "--device"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--device", "cuda:x"], "--device"),
    # --seq-len 100 at the default ratio 0.25: group size 24, and 100 % 24 != 0.
    (["--tiny", "--data", "x", "--output-dir", "o", "--mode", "s2", "--seq-len", "100"],
     "--mode s2 needs --seq-len (100) to be a multiple of the group size (24"),
    (["--tiny", "--data", "x", "--output-dir", "o", "--mode", "s2", "--seq-len", "64",
      "--group-size", "24"],
     "--mode s2 needs --seq-len (64) to be a multiple of the group size (24"),
])
def test_bad_flags_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_good_flags_parse():
    args = train.parse_args(["--tiny", "--data", str(TEXT), "--output-dir", "o", "--max-grad-norm", "inf",
                             "--lr", "3e-4", "--weight-decay", "0", "--lora-r", "2",
                             "--lora-alpha", "0.5", "--device", "cpu", "--mode", "s2",
                             "--seq-len", "64", "--group-size", "16"])
    assert args.max_grad_norm == float("inf") and args.lr == 3e-4 and args.weight_decay == 0
    assert (args.lora_r, args.lora_alpha, args.device) == (2, 0.5, "cpu")
    assert (args.mode, args.seq_len, args.group_size) == ("s2", 64, 16)


def test_bad_flag_writes_nothing(tmp_path):
    """Rejected by the parser: no model built, no base_model/ saved, no output directory."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(["--tiny", "--data", str(TEXT), "--output-dir", str(out), "--mode", "s2",
                    "--seq-len", "100", "--steps", "1"])
    assert exc.value.code == 2
    assert not out.exists()


def test_too_little_text_writes_nothing(tmp_path, capsys):
    """The corpus is cut before the model is built: the parser's one-line error and exit
    status, no base_model/ left behind, no temporary folder either."""
    out, text = tmp_path / "run", tmp_path / "short.txt"
    text.write_text("too short")
    with pytest.raises(SystemExit) as exc:
        train.main(["--tiny", "--data", str(text), "--output-dir", str(out), "--seq-len", "64"])
    assert exc.value.code == 2
    assert "error: --data: the corpus has" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


TINY_RUN = ["--tiny", "--data", str(TEXT), "--seq-len", "64", "--steps", "1",
            "--no-gradient-checkpointing", "--device", "cpu"]


def test_a_used_output_dir_is_refused_and_an_interrupted_run_changes_nothing(tmp_path,
                                                                            monkeypatch, capsys):
    """A second run into a used --output-dir needs --overwrite-output-dir; one stopped during
    training leaves the first run's base model and adapter as they were, and no temporary
    folder; a finished one replaces them together."""
    out = tmp_path / "run"
    train.main(TINY_RUN + ["--output-dir", str(out)])
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        train.main(TINY_RUN + ["--output-dir", str(out), "--seed", "1"])
    assert exc.value.code == 2 and "--overwrite-output-dir" in capsys.readouterr().err

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", stopped)
        with pytest.raises(KeyboardInterrupt):
            train.main(TINY_RUN + ["--output-dir", str(out), "--seed", "1",
                                   "--overwrite-output-dir"])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

    train.main(TINY_RUN + ["--output-dir", str(out), "--seed", "1", "--overwrite-output-dir"])
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert second.keys() == first.keys()
    for name in (Path("adapter_model.safetensors"), Path("base_model/model.safetensors")):
        assert second[name] != first[name], name  # another seed: both parts replaced
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_unwritable_output_dir_fails_before_anything_is_built(tmp_path, monkeypatch, capsys):
    """An --output-dir that cannot be written (here: below a file) fails before a model is
    built, with the parser's one-line error."""
    def never(*args):
        raise AssertionError("a model was built")

    monkeypatch.setattr(train, "build_model", never)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exc:
        train.main(TINY_RUN + ["--output-dir", str(blocker / "run")])
    assert exc.value.code == 2
    assert "--output-dir: cannot write" in capsys.readouterr().err


def test_train_s2_at_a_valid_length(tmp_path):
    """--mode s2 with --seq-len a multiple of the ratio's group size (96 * 0.25 = 24) trains, so
    the parser computes the group size the trainer uses; inf turns clipping off."""
    out = tmp_path / "run"
    train.main(["--tiny", "--data", str(TEXT), "--output-dir", str(out), "--mode", "s2",
                "--seq-len", "96", "--steps", "1", "--lr", "1e-3", "--warmup-steps", "0",
                "--max-grad-norm", "inf", "--no-gradient-checkpointing", "--device", "cpu"])
    assert json.loads((out / "config.json").read_text())["sinklora"]["mode"] == "s2"
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("num_blocks", [4, 2])
def test_blocks_serve_every_block_once_per_epoch(num_blocks):
    """Batches of 2 blocks of 3 tokens; 2 blocks is a corpus of exactly one batch. An endless
    wait for a batch fails after 20 s instead of hanging."""
    def timeout(signum, frame):
        raise TimeoutError("no batch within 20 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    try:
        batches = train.blocks(torch.arange(3 * num_blocks), 3, 2,
                               torch.Generator().manual_seed(num_blocks))
        for _ in range(3):  # epochs
            rows = sorted(tuple(r) for _ in range(num_blocks // 2) for r in next(batches).tolist())
            assert rows == [tuple(range(3 * i, 3 * i + 3)) for i in range(num_blocks)]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "sub" / "b.txt").write_text("ab")
    (tmp_path / "c.md").write_text("skipped by the pattern")
    files = train.corpus_files([tmp_path], "*.txt")
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    tokens = train.tokenize_corpus(files, None, train.BYTE_EOS)
    assert tokens.tolist() == [*"héllo".encode(), train.BYTE_EOS, *b"ab", train.BYTE_EOS]
    batches = train.blocks(tokens, 3, 2, torch.Generator().manual_seed(0))
    first = next(batches)
    assert first.shape == (2, 3)
    table = [tuple(b) for b in tokens[:9].view(3, 3).tolist()]
    rows = [tuple(r) for r in first.tolist()]
    assert rows[0] != rows[1] and all(r in table for r in rows)
    with pytest.raises(ValueError, match="--seq-len"):
        train.blocks(tokens, 6, 2, torch.Generator())
    with pytest.raises(FileNotFoundError, match="--data"):
        train.corpus_files([tmp_path / "missing"], "*.txt")
    with pytest.raises(FileNotFoundError, match="--data"):
        train.corpus_files([tmp_path], "*.rst")
