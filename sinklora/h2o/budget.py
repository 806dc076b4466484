"""The H2O budget: how many entries each (sequence, kv head) keeps, and of which kind."""
import numbers
from dataclasses import dataclass


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
    """Validated :class:`H2OBudget`; ``ValueError`` names the bad argument."""
    for name, value in (("heavy_budget", heavy_budget), ("recent_budget", recent_budget),
                        ("num_sink", num_sink)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if heavy_budget + recent_budget + num_sink == 0:
        raise ValueError("heavy_budget + recent_budget + num_sink must be > 0, "
                         "got a total budget of 0")
    return H2OBudget(int(heavy_budget), int(recent_budget), int(num_sink))
