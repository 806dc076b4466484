"""H2O heavy-hitter KV cache (``docs/spec/h2o.md``): the decoding half of sinklora.

``budget.py``: :class:`H2OBudget`, entries kept of each kind; ``state.py``: :class:`H2OState`,
one layer's entries and the one owner of their bookkeeping; ``policy.py``: the selection both
backends share (what prefill keeps, what a step evicts); ``reference.py``: prefill and decode in
plain PyTorch, the twins of the kernels ``sinklora/kernels/h2o_*.py``; ``ops.py``: the checked
functional ops ``h2o_prefill`` / ``h2o_decode``. ``H2OCache`` is in ``sinklora.hf.cache``.
"""
from .budget import H2OBudget, check_budget
from .ops import h2o_decode, h2o_prefill
from .state import H2OState

__all__ = ["H2OState", "H2OBudget", "check_budget", "h2o_prefill", "h2o_decode"]
