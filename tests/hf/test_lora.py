"""LongLoRA's recipe: lora_config() with peft, gradient checkpointing through SF-Attn, and
extend_context()'s RoPE scaling (linear interpolation, Llama 3's llama3)."""
import math

import peft
import pytest
import torch
from hf_helpers import build, rel_err
from transformers import LlamaConfig, LlamaForCausalLM

import sinklora
from sinklora.train import enable_checkpointing


def test_lora_config_is_longloras_recipe():
    cfg = sinklora.lora_config()
    assert isinstance(cfg, peft.LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (8, 16, 0.05, "none")
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(cfg.modules_to_save) == {"embed_tokens", "norm"}
    assert cfg.task_type == "CAUSAL_LM"


def test_trainable_parameters():
    model = peft.get_peft_model(build("llama", "sinklora"), sinklora.lora_config(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {n.split(".")[-3] if "lora_" in n else n.split(".modules_to_save")[0].split(".")[-1]
             for n in trainable}
    assert kinds == {"lora_A", "lora_B", "embed_tokens", "input_layernorm",
                     "post_attention_layernorm", "norm"}
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 2 * 4 * 2  # A and B, q/k/v/o, 2 layers
    assert not any("mlp" in n or "lm_head" in n for n in trainable)


def test_gradient_checkpointing_backward_matches_plain():
    """peft LoRA + gradient checkpointing + SF-Attn: same loss and gradients as without."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = build("llama", "sinklora", group_size=8)
        if checkpointing:
            enable_checkpointing(base)
            assert base.model.gradient_checkpointing
        model = peft.get_peft_model(base, sinklora.lora_config()).train()
        with torch.no_grad():  # LoRA B starts at 0; nonzero so A gets a gradient too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        torch.manual_seed(1)
        input_ids = torch.randint(0, 256, (2, 40))
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        results.append((loss.detach(), grads))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.allclose(loss0, loss1, rtol=1e-6)
    for name, g in grads0.items():
        assert rel_err(grads1[name], g) < 1e-5, name


@pytest.mark.parametrize("kwargs, name, error", [
    (dict(r=0), "r", ValueError),
    (dict(r=2.0), "r", TypeError),
    (dict(alpha=-1), "alpha", ValueError),
    (dict(alpha="16"), "alpha", TypeError),
    (dict(dropout=1.0), "dropout", ValueError),
    (dict(target_modules="q_proj"), "target_modules", TypeError),
    (dict(target_modules=()), "target_modules", ValueError),
    (dict(trainable_modules=[3]), "trainable_modules", TypeError),
    (dict(trainable_modules=None), "trainable_modules", TypeError),
    (dict(target_modules=4), "target_modules", TypeError),
    (dict(trainable_modules="norm"), "trainable_modules", TypeError),
    (dict(target_modules=["q_proj", ""]), "target_modules", TypeError),
    (dict(target_modules=(m for m in ())), "target_modules", ValueError),
])
def test_lora_config_bad_arguments(kwargs, name, error):
    with pytest.raises(error, match=name):
        sinklora.lora_config(**kwargs)


def test_lora_config_takes_dropout_zero():
    assert sinklora.lora_config(dropout=0).lora_dropout == 0.0


def test_lora_config_takes_any_iterable_of_names():
    """A generator is read once, not used up by the check; no trainable modules: plain LoRA."""
    cfg = sinklora.lora_config(target_modules=(m for m in ("q_proj", "v_proj")),
                               trainable_modules=())
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.modules_to_save is None


@pytest.mark.parametrize("max_length, factor", [(1000, 4), (1024, 4), (1025, 5), (100, 1)])
def test_extend_context_config(max_length, factor):
    config = LlamaConfig(max_position_embeddings=256, rope_theta=5000.0)
    assert sinklora.extend_context(config, max_length) == factor
    assert factor == max(1, math.ceil(max_length / 256))
    assert config.max_position_embeddings == 256  # LongLoRA's convention: the base's context
    expected = ({"rope_type": "default", "rope_theta": 5000.0} if factor == 1 else
                {"rope_type": "linear", "factor": float(factor), "rope_theta": 5000.0})
    assert config.rope_parameters == expected
    # Again, from the extended config: still measured against the original 256 positions.
    assert sinklora.extend_context(config, 2 * max_length) == math.ceil(2 * max_length / 256)
    # A shorter target keeps the factor the model was extended (and tuned) with.
    assert sinklora.extend_context(config, max_length) == math.ceil(2 * max_length / 256)
    assert config.rope_parameters["rope_type"] == ("default" if 2 * max_length <= 256 else
                                                   "linear")


def test_extend_context_reads_longlora_checkpoints():
    """LongLoRA's 32k Llama-2 configs keep max_position_embeddings 4096 and set factor 8."""
    config = LlamaConfig(max_position_embeddings=4096,
                         rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4})
    assert sinklora.extend_context(config, 32768) == 8.0
    assert config.rope_parameters["factor"] == 8.0
    assert sinklora.extend_context(config, 65536) == 16
    assert config.rope_parameters == {"rope_type": "linear", "factor": 16.0, "rope_theta": 1e4}
    assert config.max_position_embeddings == 4096


def test_extend_context_reads_a_linear_factor_of_one():
    config = LlamaConfig(max_position_embeddings=256,
                         rope_parameters={"rope_type": "linear", "factor": 1.0, "rope_theta": 1e4})
    assert sinklora.extend_context(config, 200) == 1.0
    assert sinklora.extend_context(config, 1000) == 4
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}


def test_extend_context_interpolates_model_positions():
    """After extend_context(model, 4 * L), position p rotates like position p / 4 did."""
    model = build("llama").eval()
    original = model.model.rotary_emb
    x = torch.randn(1, 8, 16)
    positions = torch.arange(0, 64, 4)[None]
    input_ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        cos0, sin0 = original(x, positions // 4)
        logits0 = model(input_ids=input_ids, position_ids=positions // 4).logits
        assert sinklora.extend_context(model, 4 * 256) == 4
        cos1, sin1 = model.model.rotary_emb(x, positions)
        logits1 = model(input_ids=input_ids, position_ids=positions).logits
    assert model.model.rotary_emb is not original
    assert rel_err(cos1, cos0) < 1e-6 and rel_err(sin1, sin0) < 1e-6
    assert rel_err(logits1, logits0) < 1e-5


def test_extend_context_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        sinklora.extend_context(LlamaConfig(), 0)
    with pytest.raises(TypeError, match="max_length"):
        sinklora.extend_context(LlamaConfig(), 4096.0)
    with pytest.raises(TypeError, match="model_or_config"):
        sinklora.extend_context({"max_position_embeddings": 2048}, 4096)
    no_factor = LlamaConfig(max_position_embeddings=1024)
    no_factor.rope_parameters = {"rope_type": "linear", "rope_theta": 1e4}
    with pytest.raises(ValueError, match="model_or_config .*'factor' >= 1"):
        sinklora.extend_context(no_factor, 4096)
    no_factor.rope_parameters = {"rope_type": "linear", "factor": 0.5, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="model_or_config .*'factor' >= 1"):
        sinklora.extend_context(no_factor, 4096)


def _inv_freq(theta, head_dim):
    """Default RoPE frequencies, float64."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _llama3_inv_freq(theta, head_dim, factor, low, high, original):
    """Llama 3.1's scaled frequencies by its definition, float64: wavelengths longer than
    ``original / low`` are divided by ``factor``, shorter than ``original / high`` kept, and the
    band between interpolates linearly in ``original / wavelength``."""
    freq = _inv_freq(theta, head_dim)
    wavelen = 2 * math.pi / freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * freq / factor + smooth * freq


def _rotary_inv_freq(model):
    return model.model.rotary_emb.inv_freq.double()


def test_extend_context_llama3_scaling():
    """A Llama 3.1-style config (llama3 RoPE, factor 8 over 128 original positions, covering
    1024): extending to 3000 multiplies factor and covered context by 3, the frequencies equal
    the definition's, and the extended config saves and loads."""
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    config = LlamaConfig(hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                         max_position_embeddings=1024, rope_parameters=dict(llama3))
    model = LlamaForCausalLM(config)
    head_dim = 64
    before = _llama3_inv_freq(500000.0, head_dim, 8.0, 1.0, 4.0, 128)
    assert torch.allclose(_rotary_inv_freq(model), before, rtol=1e-6, atol=0)
    assert sinklora.extend_context(model, 1024) == 8.0  # covered already: unchanged
    assert model.config.rope_parameters == llama3

    assert sinklora.extend_context(model, 3000) == 24.0
    assert model.config.rope_parameters == dict(llama3, factor=24.0)
    assert model.config.max_position_embeddings == 3072
    after = _llama3_inv_freq(500000.0, head_dim, 24.0, 1.0, 4.0, 128)
    assert torch.allclose(_rotary_inv_freq(model), after, rtol=1e-6, atol=0)
    # The short wavelengths are as trained, the longest interpolated 3x more.
    assert after[0] == before[0] and torch.allclose(after[-1], before[-1] / 3)
    assert sinklora.extend_context(model, 3000) == 24.0  # again: no compounding


def test_extend_context_llama3_config_saves(tmp_path):
    config = LlamaConfig(max_position_embeddings=1024, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    sinklora.extend_context(config, 4096)
    config.save_pretrained(tmp_path)
    loaded = LlamaConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == config.rope_parameters
    assert loaded.rope_parameters["factor"] == 32.0 and loaded.max_position_embeddings == 4096


def test_extend_context_llama3_0_default_rope():
    """Llama 3.0: default RoPE with theta 500000 over 8192 positions (here 256): linear
    interpolation, theta kept, frequencies the default ones over the factor."""
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64, max_position_embeddings=256,
                         rope_theta=500000.0)
    model = LlamaForCausalLM(config)
    assert sinklora.extend_context(model, 1000) == 4
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 500000.0}
    assert torch.allclose(_rotary_inv_freq(model), _inv_freq(500000.0, 32) / 4, rtol=1e-6)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
])
def test_extend_context_refuses_other_rope_types(rope):
    config = LlamaConfig(max_position_embeddings=1024, rope_parameters=rope)
    with pytest.raises(ValueError, match=f"rope_type='{rope['rope_type']}'"):
        sinklora.extend_context(config, 4096)
    assert config.rope_parameters == rope


def test_lora_config_finds_the_projections_of_the_model():
    """Separate q/k/v/o (Llama) or Phi-3's fused qkv_proj: LoRA lands on every attention
    projection; a model with neither, or a target it does not have, is refused."""
    from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, vocab_size=64, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
    llama, phi3 = LlamaForCausalLM(LlamaConfig(**small)), Phi3ForCausalLM(Phi3Config(**small))
    assert sinklora.lora_config(model=llama).target_modules == set(sinklora.hf.lora.LORA_TARGETS)
    peft_phi3 = peft.get_peft_model(phi3, sinklora.lora_config(model=phi3))
    with_lora = {n.rpartition(".lora_A")[0].rpartition(".")[2]
                 for n, _ in peft_phi3.named_parameters() if ".lora_A" in n}
    assert with_lora == {"qkv_proj", "o_proj"}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*has none of the attention"):
        sinklora.lora_config(model=gpt2)
    with pytest.raises(ValueError, match=r"\['q_proj'\] name no module of model \(Phi3"):
        sinklora.lora_config(model=Phi3ForCausalLM(Phi3Config(**small)),
                             target_modules=["qkv_proj", "q_proj"])
    assert sinklora.lora_config(model=gpt2, target_modules=["c_attn"]).target_modules == {"c_attn"}
    assert sinklora.lora_config(target_modules=None).target_modules == set(
        sinklora.hf.lora.LORA_TARGETS)  # no model: Llama's names
