"""What every sinklora kernel launcher and its public entry point share."""
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreted():
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend, device):
    """``"triton"`` or ``"torch"`` for tensors on ``device``: ``"auto"`` takes the kernels on
    CUDA and the PyTorch path elsewhere; ``"triton"`` on CPU tensors needs the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreted():
        raise ValueError(f"backend='triton' needs CUDA tensors, got {device.type} tensors "
                         "(or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    return backend


def dot_precision(dtype):
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``.

    fp32 operands get fp32-accurate products from three TF32 tensor-core products ("tf32x3"):
    no silent TF32 rounding, and unlike plain FMA "ieee" dots it compiles in seconds at
    attention tile sizes. 16-bit operands take the default.
    """
    return "tf32x3" if dtype == torch.float32 else None
