"""Every argument check of the public API, and the backend choice, under one rule: a wrong type
is a ``TypeError``, a wrong value a ``ValueError``, and both name the argument."""
import math
import numbers

import torch

from .kernels.common import interpreted

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int(name, value, minimum=None):
    """``value`` as a Python int: any integral number (numpy's too), never a bool or float; at
    least ``minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name, value):
    """``value`` as a Python float: any real number (numpy's too), never a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_softmax_scale(softmax_scale, head_dim):
    """``softmax_scale`` as a float: ``1 / sqrt(head_dim)`` when ``None``, else a finite
    positive number (SF-Attn and H2O share this rule)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    softmax_scale = check_float("softmax_scale", softmax_scale)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite positive float, got {softmax_scale}")
    return softmax_scale


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_attention_inputs(names, tensors, layout):
    """Query, key, value (called ``names``) of ``layout`` (``"B, H, N, D"``, heads at dim 1):
    floating-point tensors of one dtype on one device; key and value of one shape, the query's
    but in the heads, whose number divides the query's (GQA); nothing empty."""
    dims = layout.count(",") + 1
    for name, t in zip(names, tensors):
        _check_tensor(name, t)
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D [{layout}], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    (q_name, k_name, v_name), (q, k, v) = names, tensors
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{', '.join(names)} must share a dtype, got "
                        f"{', '.join(str(t.dtype) for t in tensors)}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{', '.join(names)} must be on one device, got "
                         f"{', '.join(str(t.device) for t in tensors)}")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        want = ", ".join(["Hkv" if i == 1 else str(size) for i, size in enumerate(q.shape)])
        raise ValueError(f"{k_name} must be [{layout.replace('H', 'Hkv', 1)}] = [{want}] to "
                         f"match {q_name}, got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{q_name} heads ({q.shape[1]}) must be a multiple of "
                         f"{k_name}/{v_name} heads ({k.shape[1]})")
    if q.numel() == 0:
        raise ValueError(f"{q_name} must be non-empty, got shape {tuple(q.shape)}")


def check_mask(name, mask, shape, device):
    """``mask`` (1 = real token, 0 = pad) of ``shape`` as bool on ``device``; ``None`` stays."""
    if mask is None:
        return None
    _check_tensor(name, mask)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must be of shape {shape} (1 = real token), got "
                         f"{tuple(mask.shape)}")
    # Only a mask of another dtype is read (a device sync): a bool one is 0/1 by construction.
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1 (1 = real token), got other values in "
                         f"a {mask.dtype} tensor")
    return mask.to(device=device, dtype=torch.bool)


def check_backend(backend):
    """``backend`` is one of ``BACKENDS``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend, tensor, name):
    """``"triton"`` or ``"torch"`` for the input ``tensor`` (called ``name`` in errors):
    ``"auto"`` takes the kernels on CUDA and the PyTorch path elsewhere; ``"triton"`` on CPU
    tensors needs the interpreter. With ``"triton"`` the tensor's dtype is checked too."""
    check_backend(backend)
    device = tensor.device.type
    if backend == "auto":
        backend = "triton" if device == "cuda" else "torch"
    elif backend == "triton" and device != "cuda" and not interpreted():
        raise ValueError(f"backend='triton' needs CUDA tensors, got {device} tensors "
                         "(or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    if backend == "triton":
        _check_kernel_dtype(name, tensor)
    return backend


def _check_kernel_dtype(name, tensor):
    """The Triton kernels take fp16, bf16 and fp32; on CPU tensors they run in Triton's
    interpreter, which computes bf16 loads, stores and dots wrongly: refused, not garbage."""
    if tensor.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton': the Triton kernels take {name} dtypes "
                        f"{KERNEL_DTYPES}, got {tensor.dtype}")
    if tensor.dtype == torch.bfloat16 and tensor.device.type != "cuda":
        raise TypeError(f"backend='triton' on {tensor.device.type} tensors runs Triton's CPU "
                        f"interpreter, which computes bfloat16 wrongly: {name} is bfloat16; use "
                        "float16 / float32 there, or backend='torch'")
