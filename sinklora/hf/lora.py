"""LongLoRA's context-extension recipe: the LoRA setup and linear RoPE position interpolation."""
import math

from peft import LoraConfig
from transformers import PreTrainedConfig

from .._checks import check_float, check_int

# LongLoRA trains LoRA on the attention projections plus, in full, every parameter whose name
# contains "embed" or "norm" (its --trainable_params "embed,norm"). peft's modules_to_save
# matches module names by suffix, so "norm" covers input_layernorm, post_attention_layernorm
# and the final norm.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAINABLE_MODULES = ("embed_tokens", "norm")


def lora_config(r=8, alpha=16, *, dropout=0.05, target_modules=LORA_TARGETS,
                trainable_modules=TRAINABLE_MODULES, **kwargs):
    """LongLoRA's LoRA recipe as a ``peft.LoraConfig`` for ``peft.get_peft_model``.

    LoRA of rank ``r`` (8) and scale ``alpha`` (16) on ``q_proj, k_proj, v_proj, o_proj``;
    the embeddings and all norms trained in full and saved with the adapter
    (``modules_to_save``), which LongLoRA found necessary for context extension. Causal-LM task,
    no bias training, LoRA dropout 0.05 as in LongLoRA's scripts.

    Args:
        r: LoRA rank, int >= 1.
        alpha: LoRA alpha (the update is scaled by ``alpha / r``), positive number.
        dropout: dropout on the LoRA input, in ``[0, 1)``.
        target_modules: module name suffixes that get LoRA, a non-empty iterable of str.
        trainable_modules: module name suffixes trained in full (``modules_to_save``), an
            iterable of str; empty for plain LoRA.
        **kwargs: passed on to ``LoraConfig``.
    """
    r = check_int("r", r, minimum=1)
    alpha = check_float("alpha", alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite positive number, got {alpha}")
    dropout = check_float("dropout", dropout)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    target_modules = _module_names("target_modules", target_modules)
    trainable_modules = _module_names("trainable_modules", trainable_modules)
    if not target_modules:
        raise ValueError("target_modules must name at least one module")
    alpha = int(alpha) if alpha.is_integer() else alpha  # 16, as peft and LongLoRA write it
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules, modules_to_save=trainable_modules or None,
                      bias="none", task_type="CAUSAL_LM", **kwargs)


def _module_names(name, names):
    """``names`` as a list of non-empty strings. A lone str is refused rather than split into
    characters (or, by peft, taken as a regex); any other iterable is listed once, so a
    generator is not used up by the check and then seen as empty."""
    if isinstance(names, str):
        raise TypeError(f"{name} must be a sequence of module names, not a str ({names!r})")
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of module names, "
                        f"got {type(names).__name__}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{name} must hold non-empty module name strings, got {names!r}")
    return names


def extend_context(model_or_config, max_length):
    """Linear RoPE scaling (position interpolation) so the model covers ``max_length`` tokens.

    Sets ``rope_parameters`` (transformers 5.x; ``rope_scaling`` is its legacy alias) to
    ``{"rope_type": "linear", "factor": ceil(max_length / max_position_embeddings)}``, keeping
    ``rope_theta``, and leaves ``max_position_embeddings`` at the pretraining context. That is
    LongLoRA's convention (its scripts set only the factor), which vLLM also reads: a
    linear-RoPE config covers ``max_position_embeddings * factor`` tokens. A model that
    already covers ``max_length`` keeps its factor (its weights were tuned for it), so calling
    this again never compounds nor undoes an extension. Given a model, its rotary embedding
    modules are rebuilt from the new config, since they computed their frequencies when
    created.

    A linear-RoPE checkpoint whose ``max_position_embeddings`` already counts the factor
    (some do: ``max_position_embeddings`` 32768 with factor 8 for a 4k base) is read as a 32k
    base; set its ``max_position_embeddings`` to the base's context before calling this.

    Args:
        model_or_config: a transformers model (or peft model) or its config, with default or
            linear RoPE (other RoPE types, such as Llama 3's, raise ``ValueError``).
        max_length: the training / inference context to reach, int >= 1.

    Returns:
        the scaling factor now in effect: the new int factor, or the model's own (1 for
        default RoPE) when it already covers ``max_length``.
    """
    max_length = check_int("max_length", max_length, minimum=1)
    model = None if isinstance(model_or_config, PreTrainedConfig) else model_or_config
    config = model_or_config if model is None else getattr(model, "config", None)
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"model_or_config must be a transformers model or config, "
                        f"got {type(model_or_config).__name__}")
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        raise ValueError(f"model_or_config has no single RoPE setting (rope_parameters={rope!r})")
    if rope["rope_type"] == "default":
        old_factor = 1
    elif rope["rope_type"] == "linear":
        old_factor = rope.get("factor")
        if (isinstance(old_factor, bool) or not isinstance(old_factor, (int, float))
                or not (math.isfinite(old_factor) and old_factor >= 1)):
            raise ValueError(f"model_or_config has linear RoPE without a scaling 'factor' >= 1 "
                             f"in rope_parameters={rope!r}, so the context it covers is unknown")
    else:
        raise ValueError(f"extend_context supports default or linear RoPE, this model_or_config "
                         f"uses rope_type={rope['rope_type']!r}")
    factor = math.ceil(max_length / config.max_position_embeddings)
    if factor <= old_factor:
        return old_factor
    other = {k: v for k, v in rope.items() if k not in ("rope_type", "factor")}
    config.rope_parameters = {"rope_type": "linear", "factor": float(factor), **other}
    if model is not None:
        _rebuild_rotary_embeddings(model)
    return factor


def _rebuild_rotary_embeddings(model):
    for name, module in list(model.named_modules()):
        if not (type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")):
            continue
        fresh = type(module)(module.config).to(module.inv_freq.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
