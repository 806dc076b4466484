"""What every sinklora kernel launcher shares."""
import torch


def dot_precision(dtype):
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``.

    fp32 operands get fp32-accurate products from three TF32 tensor-core products ("tf32x3"):
    no silent TF32 rounding, and unlike plain FMA "ieee" dots it compiles in seconds at
    attention tile sizes. 16-bit operands take the default.
    """
    return "tf32x3" if dtype == torch.float32 else None
