"""replace_llama_attn(): SF-Attn in training equals the spec's dense-mask attention (logits and
gradients), evaluation equals plain SDPA, and bad arguments raise."""
import re

import peft
import pytest
import torch
from hf_helpers import ARCHS, build, rel_err
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

import sinklora
from sinklora import hf

# fp32 model; the reference attention is float64 and rounded to fp32 once per layer.
LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4
N = 37  # not a multiple of any group size below


def _logits_and_grads(model, input_ids, attn):
    model.set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


SETTINGS = [
    {},  # LongLoRA's ratio: G = int(37 * 0.25) = 9 -> 8
    {"group_size": 6, "num_sink": 0, "shift_heads": 4},
    {"group_size_ratio": 0.5, "num_sink": 3, "shift_heads": 1},
]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("settings", SETTINGS, ids=["ratio", "G6-S0-allshift", "half-S3-shift1"])
def test_training_matches_dense_reference(arch, settings):
    model = build(arch, "sinklora", **settings).train()
    input_ids = torch.randint(0, 256, (2, N))
    logits, grads = _logits_and_grads(model, input_ids, hf.ATTN_NAME)
    ref_logits, ref_grads = _logits_and_grads(model, input_ids, hf.REFERENCE_ATTN_NAME)
    assert rel_err(logits, ref_logits) < LOGITS_TOL
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < GRAD_TOL, name


def test_s2_mode_matches_dense_reference():
    model = build("llama", "sinklora", group_size=8, mode="s2", num_sink=0).train()
    input_ids = torch.randint(0, 256, (1, 32))
    logits, grads = _logits_and_grads(model, input_ids, hf.ATTN_NAME)
    ref_logits, ref_grads = _logits_and_grads(model, input_ids, hf.REFERENCE_ATTN_NAME)
    assert rel_err(logits, ref_logits) < LOGITS_TOL
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < GRAD_TOL, name


def test_compiled_training_step_matches_eager():
    # torch.compile over the whole model: the attention glue traces (the host-side check for
    # padded / packed documents graph-breaks, it does not fail) and matches eager.
    model = build("llama", "sinklora", group_size=8).train()
    input_ids = torch.randint(0, 256, (2, N))
    ref_logits, ref_grads = _logits_and_grads(model, input_ids, hf.ATTN_NAME)
    model.zero_grad(set_to_none=True)
    try:
        out = torch.compile(model, backend="aot_eager")(input_ids=input_ids, labels=input_ids,
                                                        use_cache=False)
        out.loss.backward()
    finally:
        torch._dynamo.reset()
    assert rel_err(out.logits.detach(), ref_logits) < LOGITS_TOL
    for name, g in ref_grads.items():
        assert rel_err(dict(model.named_parameters())[name].grad, g) < GRAD_TOL, name


def test_group_size_rule():
    """int(N * ratio), then down to even, at least 2: 30 * 0.25 = 7.5 -> 6, never rounded up."""
    settings = hf.sf_settings()
    assert ([hf.group_size_for(settings, n) for n in (4, 8, 30, 37, 38, 40, 4096)]
            == [2, 2, 6, 8, 8, 10, 1024])
    assert hf.group_size_for(hf.sf_settings(group_size_ratio=0.3), 25) == 6  # int(7.5) = 7
    assert hf.group_size_for(hf.sf_settings(group_size_ratio=1), 37) == 36  # the upper end
    assert hf.group_size_for(hf.sf_settings(group_size=6), 4096) == 6


def test_train_eval_switch():
    """eval() is full causal attention (same logits as SDPA); train() is SF-Attn (differs)."""
    model = build("llama", "sinklora", group_size=8)
    input_ids = torch.randint(0, 256, (2, N))
    with torch.no_grad():
        model.eval()
        eval_logits = model(input_ids=input_ids).logits
        model.train()
        train_logits = model(input_ids=input_ids, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        sdpa_logits = model(input_ids=input_ids).logits
    assert rel_err(eval_logits, sdpa_logits) < LOGITS_TOL
    assert rel_err(train_logits, sdpa_logits) > 1e-3
    # The first G tokens see exactly what causal attention shows them in unshifted heads only;
    # in the shifted heads the first half-group is its own group, so only it matches everywhere.
    assert rel_err(train_logits[:, :4], sdpa_logits[:, :4]) < LOGITS_TOL


def test_settings_stored_on_config_and_saved(tmp_path):
    model = build("llama", "sinklora", group_size=10, num_sink=2, mode="sf", shift_heads=1)
    assert model.config._attn_implementation == "sinklora"
    model.config.save_pretrained(tmp_path)
    loaded = LlamaConfig.from_pretrained(tmp_path)
    assert loaded.sinklora == {"group_size_ratio": 0.25, "group_size": 10, "num_sink": 2,
                               "mode": "sf", "shift_heads": 1}


@pytest.fixture
def restored():
    """Undoes replace_llama_attn()'s default after the test, so other tests keep transformers'."""
    yield
    hf.restore_llama_attn()
    assert "get_correct_attn_implementation" not in LlamaPreTrainedModel.__dict__


def test_default_for_new_llama_models(restored):
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, vocab_size=64)
    before = LlamaForCausalLM(LlamaConfig(**config))
    assert sinklora.replace_llama_attn(group_size=4, num_sink=1) is None
    after = LlamaForCausalLM(LlamaConfig(**config))
    explicit = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))
    assert before.config._attn_implementation == "sdpa"
    assert after.config._attn_implementation == "sinklora"
    assert after.config.sinklora["group_size"] == 4 and after.config.sinklora["num_sink"] == 1
    assert explicit.config._attn_implementation == "sdpa"


def test_restore_gives_new_llama_models_transformers_default(restored, tmp_path):
    def config():  # a fresh one each time: a model writes its implementation on its config
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, vocab_size=64)

    default = LlamaForCausalLM(config()).config._attn_implementation
    LlamaForCausalLM(config()).save_pretrained(tmp_path)
    sinklora.replace_llama_attn(group_size=4)
    switched = LlamaForCausalLM(config())
    hf.restore_llama_attn()
    assert "get_correct_attn_implementation" not in LlamaPreTrainedModel.__dict__
    for model in (LlamaForCausalLM(config()), LlamaForCausalLM.from_pretrained(tmp_path)):
        assert model.config._attn_implementation == default == "sdpa"
        assert getattr(model.config, hf.CONFIG_KEY, None) is None
    # Models made under the default keep it; restoring again is a no-op.
    assert switched.config._attn_implementation == "sinklora"
    assert switched.config.sinklora["group_size"] == 4
    hf.restore_llama_attn()
    assert LlamaForCausalLM(config()).config._attn_implementation == "sdpa"


def test_default_settings_replace_saved_ones_unless_sinklora_is_asked_for(restored, tmp_path):
    build("llama", "sinklora", group_size=8, num_sink=0).save_pretrained(tmp_path)
    sinklora.replace_llama_attn(group_size=16, num_sink=4)
    default = LlamaForCausalLM.from_pretrained(tmp_path)
    asked = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sinklora")
    assert default.config._attn_implementation == asked.config._attn_implementation == "sinklora"
    assert (default.config.sinklora["group_size"], default.config.sinklora["num_sink"]) == (16, 4)
    assert (asked.config.sinklora["group_size"], asked.config.sinklora["num_sink"]) == (8, 0)


@pytest.mark.parametrize("kwargs, error", [
    (dict(group_size_ratio=0.0), ValueError),
    (dict(group_size_ratio=1.5), ValueError),
    (dict(group_size_ratio="1/4"), TypeError),
    (dict(group_size=7), ValueError),
    (dict(group_size=0), ValueError),
    (dict(group_size=8.0), TypeError),
    (dict(num_sink=-1), ValueError),
    (dict(mode="s3"), ValueError),
    (dict(shift_heads=-1), ValueError),
    (dict(shift_heads=5), ValueError),  # the tiny model has 4 query heads
])
def test_bad_arguments_raise(kwargs, error):
    model = build("llama")
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        sinklora.replace_llama_attn(model, **kwargs)
    assert model.config._attn_implementation == "sdpa"


def test_peft_model_is_switched():
    model = peft.get_peft_model(build("llama"), sinklora.lora_config())
    assert sinklora.replace_llama_attn(model, group_size=4) is model
    assert model.get_base_model().config._attn_implementation == "sinklora"
    assert model.get_base_model().config.sinklora["group_size"] == 4


def test_bad_model_raises():
    with pytest.raises(TypeError, match="model"):
        sinklora.replace_llama_attn(torch.nn.Linear(2, 2))


def test_unsupported_layers_raise():
    model = build("mistral", "sinklora", group_size=4).train()
    model.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding_window"):
        model(input_ids=torch.randint(0, 256, (1, 20)), use_cache=False)
    model = build("llama", "sinklora", group_size=4).train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        model(input_ids=torch.randint(0, 256, (1, 20)), use_cache=False)
    model = build("llama", "sinklora", group_size=4)
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=torch.randint(0, 256, (1, 8)), use_cache=False,
              attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 18), (1, 20), (3, 20), (20,)],
                         ids=["shorter", "batch-1", "batch+1", "1-D"])
def test_mis_shaped_attention_mask_raises(shape, training):
    """Only [B, tokens seen] (or longer: transformers keeps its last columns) is a padding mask
    for input_ids [B, N]; any other shape is refused, never read as something else."""
    model = build("llama", "sinklora", group_size=4).train(training)
    input_ids = torch.randint(0, 256, (2, 20))
    mask = torch.ones(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask .*\[2, >= 20\].*" + re.escape(str(shape))):
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    longer = torch.ones(2, 25, dtype=torch.long)
    ref = model(input_ids=input_ids, use_cache=False).logits
    assert torch.equal(model(input_ids=input_ids, attention_mask=longer, use_cache=False).logits,
                       ref)


def test_non_causal_models_are_refused():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=64))
    with pytest.raises(ValueError, match="not causal.*BertSelfAttention"):
        sinklora.replace_llama_attn(bert)
    assert bert.config._attn_implementation != "sinklora"
    bert.set_attn_implementation("sinklora")  # switched by hand: refused at the call
    with pytest.raises(ValueError, match="is_causal=False"):
        bert.train()(input_ids=torch.randint(0, 64, (1, 12)))


def test_logit_softcapping_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=256, attn_logit_softcapping=5.0, sliding_window=4096)
    model = sinklora.replace_llama_attn(Gemma2ForCausalLM(config), group_size=4)
    for training in (True, False):
        with pytest.raises(ValueError, match="softcap=5.0"):
            model.train(training)(input_ids=torch.randint(0, 256, (1, 12)), use_cache=False)
