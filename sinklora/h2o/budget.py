"""The H2O budget: how many entries each (sequence, kv head) keeps, and of which kind."""
from dataclasses import dataclass

from .._checks import check_int


@dataclass(frozen=True)
class H2OBudget:
    """``num_sink`` sinks + ``heavy_budget`` heavy hitters + ``recent_budget`` recent tokens."""

    heavy_budget: int
    recent_budget: int
    num_sink: int = 0

    @property
    def total(self):
        """Entries kept per sequence and kv head once the stream is longer than that."""
        return self.num_sink + self.heavy_budget + self.recent_budget


def check_budget(heavy_budget, recent_budget, num_sink=0):
    """Validated :class:`H2OBudget`; ``TypeError`` (not an int) or ``ValueError`` (negative, or
    a total of 0) names the bad argument."""
    budget = H2OBudget(*(check_int(name, value, minimum=0) for name, value in zip(
        ("heavy_budget", "recent_budget", "num_sink"), (heavy_budget, recent_budget, num_sink))))
    if budget.total == 0:
        raise ValueError("heavy_budget + recent_budget + num_sink must be > 0, "
                         "got a total budget of 0")
    return budget
