"""SF-Attn (``docs/spec/sf_attn.md``): ``api.py`` has ``sf_attention``, which picks a backend;
``params.py`` SF-Attn's own argument rules; ``op.py`` the custom ops and autograd over the Triton
kernels; ``fallback.py`` the plain-PyTorch path; ``reference.py`` the dense float64 reference
and ``dense_mask``. The pattern's one definition is ``sinklora/kernels/pattern.py``."""
from .api import sf_attention
from .reference import dense_mask, sf_attention_reference

__all__ = ["sf_attention", "sf_attention_reference", "dense_mask"]
