"""The SF-Attn pattern: the one place that says which keys a query sees.

Written as ``@triton.jit`` helpers built from plain operators only, so the kernels call them
on Triton tensors while the dense reference and the PyTorch fallback call the very same
function bodies on ints or torch tensors through ``plain`` (below). See ``docs/spec/sf_attn.md``.

Per head the pattern has two numbers:

- ``shift``: 0 for an unshifted head, ``group_size // 2`` for a shifted one. Groups are
  ``[k*G - shift, (k+1)*G - shift)`` clipped to ``[0, N)``: no wrap-around.
- ``wrap_from``: where LongLoRA's ``"s2"`` wrap starts, ``N - shift`` in ``"s2"`` mode
  (``N``, i.e. nothing, for an unshifted head) and ``N`` in ``"sf"`` mode.

A key is visible through exactly one of three disjoint parts, so kernels can walk them in
separate loops without counting a key twice:

- group: ``group_start(i) <= j <= i``
- sink:  ``j < num_sink`` and ``j < group_start(i)`` (sinks already in the group count there)
- wrap:  ``i < shift`` and ``wrap_from <= j < N`` (``"s2"`` only: the future leak)
"""
import types

import triton
import triton.language as tl  # noqa: F401  the interpreter patches jit functions through it


@triton.jit
def head_shift(head, num_heads, shift_heads, group_size):
    """The LAST ``shift_heads`` query heads are shifted by half a group."""
    return group_size // 2 * (head >= num_heads - shift_heads)


@triton.jit
def wrap_start(shift, n, is_s2):
    """First key of the ``"s2"`` wrap (only shifted heads of ``"s2"`` have one)."""
    return n - shift * is_s2


@triton.jit
def group_start(i, group_size, shift):
    """First key of query/key ``i``'s group."""
    start = (i + shift) // group_size * group_size - shift
    return start * (start > 0)


@triton.jit
def group_end(i, group_size, shift, n):
    """One past the last key of ``i``'s group (the last group is cut at ``n``)."""
    end = ((i + shift) // group_size + 1) * group_size - shift
    return end - (end - n) * (end > n)


@triton.jit
def in_group(i, j, group_size, shift):
    return (j <= i) & (j >= group_start(i, group_size, shift))


@triton.jit
def in_sink(i, j, group_size, shift, num_sink):
    return (j < num_sink) & (j < group_start(i, group_size, shift))


@triton.jit
def in_wrap(i, j, shift, wrap_from, n):
    return (i < shift) & (j >= wrap_from) & (j < n)


@triton.jit
def visible(i, j, group_size, shift, num_sink, wrap_from, n):
    """Query ``i`` sees key ``j`` (the union of the three disjoint parts)."""
    return (
        in_group(i, j, group_size, shift)
        | in_sink(i, j, group_size, shift, num_sink)
        | in_wrap(i, j, shift, wrap_from, n)
    )


def _unjit(jit_fns):
    # Rebind each body to a namespace where its jit callees are plain functions too.
    namespace = dict(globals())
    for f in jit_fns:
        body = f.fn
        namespace[body.__name__] = types.FunctionType(body.__code__, namespace, body.__name__)
    return types.SimpleNamespace(**{f.fn.__name__: namespace[f.fn.__name__] for f in jit_fns})


# The same pattern for Python ints and torch tensors: ``plain.visible(i, j, ...)``.
plain = _unjit([head_shift, wrap_start, group_start, group_end, in_group, in_sink, in_wrap,
                visible])
