"""Every argument check of the public API, and the backend choice, under one rule: a wrong type
is a ``TypeError``, a wrong value a ``ValueError``, and both name the argument."""
import math
import numbers

import torch

from .kernels.common import interpreted

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int(name, value):
    """``value`` as a Python int: any integral number (numpy's too), never a bool or float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
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
