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
# The attention projections of the model families that share Llama's attention call: separate
# q/k/v/o (Llama, Mistral, Qwen2, Gemma, ...) or a fused qkv (Phi-3).
FUSED_LORA_TARGETS = ("qkv_proj", "o_proj")
TRAINABLE_MODULES = ("embed_tokens", "norm")


def lora_config(r=8, alpha=16, *, model=None, dropout=0.05, target_modules=None,
                trainable_modules=TRAINABLE_MODULES, **kwargs):
    """LongLoRA's LoRA recipe as a ``peft.LoraConfig`` for ``peft.get_peft_model``.

    LoRA of rank ``r`` (8) and scale ``alpha`` (16) on the attention projections
    (``q_proj, k_proj, v_proj, o_proj``; Phi-3's fused ``qkv_proj, o_proj``); the embeddings and
    all norms trained in full and saved with the adapter (``modules_to_save``), which LongLoRA
    found necessary for context extension. Causal-LM task, no bias training, LoRA dropout 0.05
    as in LongLoRA's scripts.

    Args:
        r: LoRA rank, int >= 1.
        alpha: LoRA alpha (the update is scaled by ``alpha / r``), positive number.
        model: the model the config is for: the projections it has are chosen (and
            ``target_modules``, when given, must all be there), or ``ValueError``. Without
            it, ``q_proj, k_proj, v_proj, o_proj``.
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
    if target_modules is not None:
        target_modules = _module_names("target_modules", target_modules)
        if not target_modules:
            raise ValueError("target_modules must name at least one module")
    trainable_modules = _module_names("trainable_modules", trainable_modules)
    if model is not None:
        target_modules = _targets_in(model, target_modules)
    target_modules = target_modules or list(LORA_TARGETS)
    alpha = int(alpha) if alpha.is_integer() else alpha  # 16, as peft and LongLoRA write it
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules, modules_to_save=trainable_modules or None,
                      bias="none", task_type="CAUSAL_LM", **kwargs)


def _targets_in(model, wanted):
    """``wanted`` (default: the attention projections ``model`` has), each checked to name
    modules of ``model``."""
    names = [name for name, _ in model.named_modules()]
    have = {name.rpartition(".")[2] for name in names}
    if wanted is None:
        wanted = next((list(t) for t in (LORA_TARGETS, FUSED_LORA_TARGETS) if set(t) <= have),
                      None)
        if wanted is None:
            raise ValueError(f"model ({type(model).__name__}) has none of the attention "
                             f"projections {LORA_TARGETS} or {FUSED_LORA_TARGETS}; pass "
                             "target_modules")
    # peft matches a target to a module name that equals it or ends with "." + it.
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"target_modules {missing} name no module of model "
                         f"({type(model).__name__})")
    return wanted


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
    """RoPE scaling so the model covers ``max_length`` tokens, per RoPE type:

    - ``default`` (Llama 2, Llama 3.0) and ``linear``: linear position interpolation, LongLoRA's
      convention (its scripts set only the factor), which vLLM also reads: ``rope_parameters``
      (``rope_scaling`` is its legacy alias) becomes ``{"rope_type": "linear", "factor":
      ceil(max_length / max_position_embeddings)}``, ``rope_theta`` kept, and
      ``max_position_embeddings`` stays the pretraining context: such a config covers
      ``max_position_embeddings * factor`` tokens. A linear-RoPE checkpoint whose
      ``max_position_embeddings`` already counts the factor (32768 with factor 8 for a 4k base)
      is read as a 32k base: set it to the base's context first.
    - ``llama3`` (Llama 3.1+): the config covers ``max_position_embeddings`` (131072 for Llama
      3.1, factor 8 over ``original_max_position_embeddings`` 8192). To cover ``m`` times that,
      ``m = ceil(max_length / max_position_embeddings)``, the ``factor`` and
      ``max_position_embeddings`` are multiplied by ``m``: the long wavelengths are interpolated
      ``m`` times more, the short ones stay as trained, the smooth band between them follows;
      ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings`` stay.
    - other types (``yarn``, ``dynamic``, ``longrope``, ...) raise ``ValueError``.

    A model that already covers ``max_length`` keeps its scaling (its weights were tuned for
    it), so calling this again never compounds nor undoes an extension. Given a model, its
    rotary embedding modules are rebuilt from the new config, since they computed their
    frequencies when created.

    Args:
        model_or_config: a transformers model (or peft model) or its config.
        max_length: the training / inference context to reach, int >= 1.

    Returns:
        the scaling factor now in effect: the new one (an int for linear interpolation), or
        the model's own (1 for default RoPE) when it already covers ``max_length``.
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
    kind = rope["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"extend_context supports default, linear and llama3 RoPE, this "
                         f"model_or_config uses rope_type={kind!r}")
    old_factor = 1 if kind == "default" else rope.get("factor")
    if (isinstance(old_factor, bool) or not isinstance(old_factor, (int, float))
            or not (math.isfinite(old_factor) and old_factor >= 1)):
        raise ValueError(f"model_or_config has {kind} RoPE without a scaling 'factor' >= 1 in "
                         f"rope_parameters={rope!r}, so the context it covers is unknown")
    times = math.ceil(max_length / config.max_position_embeddings)
    if kind == "llama3":
        if times <= 1:
            return old_factor
        factor = old_factor * times
        config.max_position_embeddings *= times
    else:
        if times <= old_factor:
            return old_factor
        factor, kind = times, "linear"
    config.rope_parameters = {**rope, "rope_type": kind, "factor": float(factor)}
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
