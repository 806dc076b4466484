"""One layer's H2O state: storage allocated for the budget, filled slot by slot, and the one
place that keeps its bookkeeping (capacity, stored entries, the decode kernel's tickets)."""
import torch


class H2OState:
    """The entries one attention layer keeps, for every sequence and kv head.

    The buffers have ``capacity`` slots (at most the budget); the first ``length`` hold entries,
    the same number for every sequence and head. They are contiguous: the Triton decode step
    reads their strides from the capacity. Slot order means nothing: keys carry their own
    RoPE, so attention does not depend on it, and decoding writes a new entry into the slot of
    the entry it evicts.

    Attributes:
        key_buffer, value_buffer: ``[B, Hkv, capacity, D]``.
        position_buffer: ``[B, Hkv, capacity]`` int64, the token's position among its
            sequence's real tokens; ``-1`` marks a pad (never attended, evicted first).
        score_buffer: ``[B, Hkv, capacity]`` float32 accumulated attention (``acc``).
        length: stored entries.
        next_position: ``[B]`` int64, real tokens seen per sequence (the next token's position).
        tickets: ``[B * Hkv]`` int32 zeros the Triton decode uses to merge its chunks (it leaves
            them at zero), made on the first Triton step; ``None`` until then.
        budget: the :class:`H2OBudget` prefill built the state for (decode steps must use the
            same); ``None`` for a state assembled by hand.

    A decode step is ``begin_step`` (room), the Triton kernel or ``decode_torch`` (entries and
    ``next_position``, written on the device), then ``end_step`` (``length``).
    """

    def __init__(self, key_buffer, value_buffer, position_buffer, score_buffer, length,
                 next_position, budget=None):
        self.key_buffer = key_buffer
        self.value_buffer = value_buffer
        self.position_buffer = position_buffer
        self.score_buffer = score_buffer
        self.length = length
        self.next_position = next_position
        self.tickets = None
        self.budget = budget

    @property
    def keys(self):
        """Stored keys ``[B, Hkv, length, D]`` (a view)."""
        return self.key_buffer[:, :, : self.length]

    @property
    def values(self):
        """Stored values ``[B, Hkv, length, D]`` (a view)."""
        return self.value_buffer[:, :, : self.length]

    @property
    def positions(self):
        """Original positions of the stored entries ``[B, Hkv, length]`` (``-1``: pad)."""
        return self.position_buffer[:, :, : self.length]

    @property
    def scores(self):
        """Accumulated attention of the stored entries ``[B, Hkv, length]``."""
        return self.score_buffer[:, :, : self.length]

    @property
    def capacity(self):
        return self.key_buffer.shape[2]

    @property
    def buffers(self):
        return (self.key_buffer, self.value_buffer, self.position_buffer, self.score_buffer,
                self.next_position)

    @property
    def nbytes(self):
        """Bytes held by this state's tensors."""
        tensors = self.buffers + (() if self.tickets is None else (self.tickets,))
        return sum(t.numel() * t.element_size() for t in tensors)

    def begin_step(self, budget_total):
        """Room for a decode step's new entry (growing geometrically, never past the budget);
        returns ``length``, its slot while below the budget (else the evicted entry's slot)."""
        entries = min(self.length + 1, budget_total)
        if entries > self.capacity:
            capacity = min(budget_total, max(entries, 2 * self.capacity))

            def grown(buffer):
                new = buffer.new_empty(*buffer.shape[:2], capacity, *buffer.shape[3:])
                new[:, :, : self.length] = buffer[:, :, : self.length]
                return new

            (self.key_buffer, self.value_buffer, self.position_buffer,
             self.score_buffer) = (grown(t) for t in self.buffers[:4])
        return self.length

    @property
    def decode_tickets(self):
        """The Triton decode's tickets, made on its first step and kept (it leaves them zero)."""
        if self.tickets is None:
            batch, num_kv_heads = self.key_buffer.shape[:2]
            self.tickets = self.key_buffer.new_zeros(batch * num_kv_heads, dtype=torch.int32)
        return self.tickets

    def end_step(self, budget_total):
        """Counts the step's new entry; at the budget it took an evicted one's slot (or left)."""
        self.length = min(self.length + 1, budget_total)

    def map_tensors(self, fn):
        """Replaces every tensor ``t`` by ``fn(t)`` (batch select / reorder / repeat, moves),
        kept contiguous; the tickets are made anew, for the new batch or device."""
        (self.key_buffer, self.value_buffer, self.position_buffer, self.score_buffer,
         self.next_position) = (fn(t).contiguous() for t in self.buffers)
        self.tickets = None

    def to(self, device, non_blocking=False):
        """Moves every tensor to ``device``."""
        self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))
        return self
