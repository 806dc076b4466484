"""``dense_mask`` (built from ``sinklora.kernels.pattern``) against the spec's own formulas,
element by element, and the structural properties the spec promises."""
import pytest
import torch

from sf_helpers import pattern_params
from sinklora.sf_attn import dense_mask

# (hq, n, group_size, num_sink, shift_heads, mode)
PATTERNS = [
    (2, 32, 8, 4, 1, "sf"),
    (4, 37, 8, 4, None, "sf"),
    (3, 29, 10, 0, 2, "sf"),
    (2, 23, 6, 9, 2, "sf"),
    (2, 5, 2, 4, 1, "sf"),
    (2, 30, 32, 4, 1, "sf"),
    (2, 30, 64, 3, 2, "sf"),
    (2, 32, 8, 4, 1, "s2"),
    (4, 48, 12, 0, None, "s2"),
    (2, 24, 4, 5, 2, "s2"),
    (2, 16, 16, 4, 1, "s2"),
]
IDS = [f"{m}-H{h}-N{n}-G{g}-S{s}-shift{sh}" for h, n, g, s, sh, m in PATTERNS]


def spec_visible(i, j, shifted, n, group_size, num_sink, mode):
    """A literal transcription of "Which keys query i sees" in docs/spec/sf_attn.md."""
    half = group_size // 2
    if j < num_sink and j <= i:
        return True
    if not shifted:
        return i // group_size == j // group_size and j <= i
    if mode == "sf":
        return (i + half) // group_size == (j + half) // group_size and j <= i
    r_i, r_j = (i - half) % n, (j - half) % n
    return r_i // group_size == r_j // group_size and r_j <= r_i


@pytest.fixture(params=PATTERNS, ids=IDS)
def pattern(request):
    hq, n, group_size, num_sink, shift_heads, mode = request.param
    p = pattern_params(hq, n, group_size, num_sink, shift_heads, mode)
    return p, dense_mask(n, hq, group_size=group_size, num_sink=num_sink,
                         shift_heads=shift_heads, mode=mode)


def test_mask_equals_the_spec_formulas(pattern):
    p, mask = pattern
    assert mask.shape == (p.num_heads, p.seq_len, p.seq_len) and mask.dtype == torch.bool
    n = p.seq_len
    for h in range(p.num_heads):
        shifted = h >= p.num_heads - p.shift_heads
        want = torch.tensor([[spec_visible(i, j, shifted, n, p.group_size, p.num_sink, p.mode)
                              for j in range(n)] for i in range(n)])
        assert torch.equal(mask[h], want), f"head {h} (shifted={shifted})"


def test_every_query_sees_itself_and_at_most_group_plus_sink_keys(pattern):
    p, mask = pattern
    assert mask.diagonal(dim1=1, dim2=2).all()
    assert mask.sum(-1).max() <= p.group_size + p.num_sink


def test_sink_columns_are_visible_to_every_query_at_or_after_them(pattern):
    p, mask = pattern
    causal = torch.ones(p.seq_len, p.seq_len, dtype=torch.bool).tril()
    sinks = causal[:, :p.num_sink]
    assert mask[:, :, :p.num_sink][:, sinks].all()


def test_only_shifted_s2_heads_see_the_future_and_only_across_the_wrap(pattern):
    p, mask = pattern
    n, half = p.seq_len, p.group_size // 2
    future = mask & torch.ones(n, n, dtype=torch.bool).triu(1)
    for h in range(p.num_heads):
        shifted = h >= p.num_heads - p.shift_heads
        if p.mode == "sf" or not shifted:
            assert not future[h].any(), f"head {h} sees a later key"
        else:
            # LongLoRA's leak: the first half-group attends to the last half-group.
            leak = torch.zeros(n, n, dtype=torch.bool)
            leak[:half, n - half:] = True
            assert torch.equal(future[h], leak), f"head {h}"


def test_unshifted_heads_are_the_same_in_both_modes():
    sf = dense_mask(48, 4, group_size=12, num_sink=4, shift_heads=2, mode="sf")
    s2 = dense_mask(48, 4, group_size=12, num_sink=4, shift_heads=2, mode="s2")
    assert torch.equal(sf[:2], s2[:2])
    assert not torch.equal(sf[2:], s2[2:])


def test_shifted_heads_are_the_last_ones():
    mask = dense_mask(32, 4, group_size=8, num_sink=0, shift_heads=1)
    assert torch.equal(mask[0], mask[1]) and torch.equal(mask[1], mask[2])
    assert not torch.equal(mask[2], mask[3])


@pytest.mark.parametrize("num_heads", [1, 3, 4, 5])
def test_defaults_are_sf_attentions(num_heads):
    """group_size is required; 4 sinks, Hq // 2 heads shifted and "sf" by default."""
    assert torch.equal(dense_mask(40, num_heads, group_size=8),
                       dense_mask(40, num_heads, group_size=8, num_sink=4,
                                  shift_heads=num_heads // 2, mode="sf"))


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0, 2), {"group_size": 8}, ValueError, "seq_len must be >= 1"),
    ((16, 0), {"group_size": 8}, ValueError, "num_heads must be >= 1"),
    ((16.0, 2), {"group_size": 8}, TypeError, "seq_len must be an int"),
    ((16, 2), {"group_size": 7}, ValueError, "group_size"),
    ((16, 2), {"group_size": 8, "shift_heads": 3}, ValueError, "shift_heads"),
    ((18, 2), {"group_size": 8, "mode": "s2"}, ValueError, "multiple of group_size"),
])
def test_bad_arguments_name_themselves(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        dense_mask(*args, **kwargs)
