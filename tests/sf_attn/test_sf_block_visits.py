"""The spec's cost rule: the kernels visit only the blocks that hold visible pairs.

Under the interpreter every row-block load of the SF-Attn kernels goes through
``_load_rows``, which this test wraps to record which program loaded which rows of which
tensor. For each program, every block it loads on the query side (q, o, dO) paired with every
block it loads on the key side (k, v) must hold at least one (query, key) pair the pattern makes
visible (``dense_mask``): a kernel that walked a block with nothing to see, or all blocks
under a mask, fails here although its values would still be right.
"""
import pytest
import torch
import triton.language as tl

import sinklora.kernels.sf_attn as kernels
from conftest import INTERPRETED
from sinklora import sf_attention
from sinklora.sf_attn import dense_mask

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="records loads under the interpreter")


def _scalar(x):
    return int(x.handle.data.item()) if hasattr(x, "handle") else int(x)


def record_loads(monkeypatch):
    """Patches ``_load_rows``; returns the list it appends ``(program, address, start, rows)``
    to (``program``: the launch's number and the program id; ``address``: the head's base
    pointer, in bytes). The interpreter runs a grid's programs one after another, from
    program (0, 0, 0)."""
    loads, load_rows = [], kernels._load_rows

    launch = [0, None]  # launches counted by the grid restarting at program (0, 0, 0)

    def recording(base, start, stride_n, n, MASKED, BLOCK, HEAD_DIM):
        pid = tuple(_scalar(tl.program_id(axis)) for axis in range(3))
        if pid == (0, 0, 0) and launch[1] != pid:
            launch[0] += 1
        launch[1] = pid
        loads.append(((launch[0], *pid), _scalar(base), _scalar(start), _scalar(BLOCK)))
        return load_rows(base, start, stride_n, n, MASKED, BLOCK, HEAD_DIM)

    monkeypatch.setattr(kernels, "_load_rows", recording)
    return loads


def locate(address, tensors):
    """``(name, head)`` of the ``[B, H, N, D]`` contiguous tensor whose head starts at
    ``address``; batch 0 only is used here."""
    for name, t in tensors.items():
        offset = address - t.data_ptr()
        head_bytes = t.shape[2] * t.shape[3] * t.element_size()
        if 0 <= offset < t.numel() * t.element_size() and offset % head_bytes == 0:
            return name, offset // head_bytes
    raise AssertionError(f"a load from an address no input or output holds: {address}")


@pytest.mark.parametrize("mode, num_sink, n, group_size", [
    ("sf", 4, 200, 48), ("sf", 0, 160, 32), ("s2", 0, 192, 48), ("s2", 4, 192, 64)])
def test_every_loaded_block_pair_holds_a_visible_pair(monkeypatch, mode, num_sink, n,
                                                      group_size):
    hq, hkv, d = 4, 2, 16
    q = torch.randn(1, hq, n, d, requires_grad=True)
    k = torch.randn(1, hkv, n, d, requires_grad=True)
    v = torch.randn(1, hkv, n, d, requires_grad=True)
    mask = dense_mask(n, hq, group_size=group_size, num_sink=num_sink, mode=mode)
    loads = record_loads(monkeypatch)
    out = sf_attention(q, k, v, group_size=group_size, num_sink=num_sink, mode=mode,
                       backend="triton")
    forward_loads = len(loads)
    do = torch.randn_like(out)
    out.backward(do)
    assert 0 < forward_loads < len(loads)
    tensors = {"q": q, "o": out, "do": do, "k": k, "v": v}
    programs = {}
    for program, address, start, rows in loads:
        name, head = locate(address, tensors)
        side = 0 if name in ("q", "o", "do") else 1
        programs.setdefault(program, ([], []))[side].append((head, start, rows))
    group = hq // hkv
    pairs = 0
    for program, (queries, keys) in programs.items():
        for h, q0, q_rows in queries:
            for g, k0, k_rows in keys:
                assert h // group == g, f"program {program} mixes heads {h} and kv head {g}"
                seen = mask[h, q0:q0 + q_rows, k0:k0 + k_rows]
                assert seen.any(), (f"program {program} visits keys {k0}..{k0 + k_rows} for "
                                    f"queries {q0}..{q0 + q_rows} of head {h}: none visible")
                pairs += 1
    assert pairs > 0  # the recording saw the kernels' loads
