"""The SF-Attn settings: validated, the group size rule, stored on a model's config by
``replace_llama_attn`` (or made the default of new Llama models, until ``restore_llama_attn``)."""
import math

from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from .._checks import check_float, check_int
from ..sf_attn.params import check_group_size, check_mode, check_num_sink

ATTN_NAME = "sinklora"
REFERENCE_ATTN_NAME = "sinklora_reference"
# The SF-Attn settings live on the model config under this key (saved with it in config.json).
CONFIG_KEY = "sinklora"
_default_settings = None  # set by replace_llama_attn() without a model


def sf_settings(group_size_ratio=0.25, group_size=None, num_sink=4, mode="sf", shift_heads=None):
    """Validated SF-Attn settings as the dict stored on a config under ``CONFIG_KEY``."""
    group_size_ratio = check_float("group_size_ratio", group_size_ratio)
    if not (math.isfinite(group_size_ratio) and 0 < group_size_ratio <= 1):
        raise ValueError(f"group_size_ratio must be in (0, 1], got {group_size_ratio}")
    if group_size is not None:
        group_size = check_group_size(group_size)
    num_sink = check_num_sink(num_sink)
    check_mode(mode)
    if shift_heads is not None:
        shift_heads = check_int("shift_heads", shift_heads, minimum=0)
    return {"group_size_ratio": group_size_ratio, "group_size": group_size,
            "num_sink": num_sink, "mode": mode, "shift_heads": shift_heads}


def group_size_for(settings, seq_len):
    """The group size used for a batch whose padded length is ``seq_len``.

    ``settings["group_size"]`` when set, else ``int(seq_len * group_size_ratio)`` rounded down
    to an even number, at least 2. As in LongLoRA, the ratio applies to the length of the
    batch tensor (the padded / packed row), not to each sequence: every sequence and document
    of the batch gets the same ``G``, and its groups start at its own first token.
    """
    if settings["group_size"] is not None:
        return settings["group_size"]
    g = int(seq_len * settings["group_size_ratio"])
    return max(2, g - g % 2)


def settings_of(module):
    """The settings on ``module``'s config, or the defaults when it has none."""
    found = getattr(module.config, CONFIG_KEY, None)
    return found if found is not None else sf_settings()


def replace_llama_attn(model=None, *, group_size_ratio=0.25, group_size=None, num_sink=4,
                       mode="sf", shift_heads=None):
    """Train with SF-Attn, decode with full attention or H2O: switch a model to ``"sinklora"``.

    In a training forward (``model.train()``, no earlier tokens in a cache) every attention
    layer runs ``sinklora.sf_attention`` with these settings; in ``model.eval()`` and in
    ``generate()`` full causal attention (SDPA), or H2O with an ``H2OCache``. Padded (2-D
    ``attention_mask``) and packed batches (``position_ids`` restarting per document, as
    ``DataCollatorWithFlattening`` makes) get groups and sinks per document, no ``N x N`` mask.

    Args:
        model: a transformers model (or a peft model wrapping one): switched alone
            (``set_attn_implementation("sinklora")``; back with ``"sdpa"``), the settings
            stored on its config as ``config.sinklora`` (saved with it). ``None``: every Llama
            model created afterwards (``LlamaForCausalLM(config)``, ``from_pretrained``)
            without an explicit ``attn_implementation`` gets ``"sinklora"`` and these settings
            (over those of a checkpoint's ``config.json``; to keep those, load with
            ``attn_implementation="sinklora"``), until ``restore_llama_attn()``. This overrides
            ``LlamaPreTrainedModel.get_correct_attn_implementation``, where transformers
            resolves an unset implementation (to ``"sdpa"``); an explicit one still wins.
        group_size_ratio: ``G = int(N * ratio)`` rounded down to even (>= 2), ``N`` the length
            of the batch tensor, as LongLoRA (0.25). Ignored when ``group_size`` is given.
        group_size: a fixed even ``G`` instead of the ratio.
        num_sink: leading tokens every query sees (SinkLoRA: 4). ``mode="sf", num_sink=0`` is
            S2 with segmentation and reassembly; LongLoRA's S2-Attn is ``mode="s2",
            num_sink=0``.
        mode: ``"sf"`` (SinkLoRA) or ``"s2"`` (LongLoRA's roll; needs every sequence length to
            be a multiple of ``G``).
        shift_heads: how many of the last query heads use shifted groups (default ``Hq // 2``).

    Returns:
        ``model`` (``None`` when called without one).

    Tested architectures (tests/hf): Llama, Mistral (``sliding_window`` unset or longer than
    the sequence) and Qwen2; they share Llama's attention call. Sliding-window layers shorter
    than the sequence raise an error.
    """
    global _default_settings
    settings = sf_settings(group_size_ratio, group_size, num_sink, mode, shift_heads)
    if model is None:
        _default_settings = settings
        LlamaPreTrainedModel.get_correct_attn_implementation = _default_to_sinklora
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (or a peft model), "
                        f"got {type(model).__name__}")
    not_causal = sorted({type(m).__name__ for m in base.modules()
                         if getattr(m, "is_causal", None) is False})
    if not_causal:
        raise ValueError(f"model's attention is not causal ({', '.join(not_causal)} has "
                         "is_causal=False); SF-Attn and H2O are causal: use a decoder-only model")
    heads = getattr(base.config, "num_attention_heads", None)
    if shift_heads is not None and heads is not None and shift_heads > heads:
        raise ValueError(f"shift_heads must be in [0, {heads}] (the model's query heads), "
                         f"got {shift_heads}")
    base.set_attn_implementation(ATTN_NAME)
    setattr(base.config, CONFIG_KEY, settings)
    return model


def restore_llama_attn():
    """Undo ``replace_llama_attn()`` without a model: Llama models created afterwards without
    an explicit ``attn_implementation`` get transformers' own default again. Models created
    before keep ``"sinklora"`` and their settings. Does nothing when no default is set."""
    # LlamaPreTrainedModel has no method of its own: without ours it inherits transformers'.
    if LlamaPreTrainedModel.__dict__.get("get_correct_attn_implementation") is _default_to_sinklora:
        del LlamaPreTrainedModel.get_correct_attn_implementation


def _default_to_sinklora(self, requested_attention, is_init_check=False):
    # Unset: replace_llama_attn()'s settings win; "sinklora" asked for keeps settings it has.
    if requested_attention is None or (requested_attention == ATTN_NAME
                                       and getattr(self.config, CONFIG_KEY, None) is None):
        setattr(self.config, CONFIG_KEY, dict(_default_settings))
    return PreTrainedModel.get_correct_attn_implementation(
        self, ATTN_NAME if requested_attention is None else requested_attention, is_init_check)
