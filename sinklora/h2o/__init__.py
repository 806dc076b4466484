"""H2O heavy-hitter KV cache (``docs/spec/h2o.md``): the decoding half of sinklora.

- ``h2o_prefill`` / ``h2o_decode``: the functional ops (``ops.py``), on the Triton kernels
  (``sinklora/kernels/h2o_*.py``) or plain PyTorch (``reference.py``);
- ``H2OState``: one layer's kept entries; ``H2OBudget``: how many of each kind.

The transformers ``Cache`` built on them, ``H2OCache``, is ``sinklora.hf.cache``.
"""
from .budget import H2OBudget, check_budget
from .ops import h2o_decode, h2o_prefill
from .state import H2OState

__all__ = ["H2OState", "H2OBudget", "check_budget", "h2o_prefill", "h2o_decode"]
