"""Draws the SF-Attn pattern for the README: which keys (columns) each query (rows) sees, for an
unshifted head and a shifted head in ``"sf"`` mode, and the same shifted head in LongLoRA's
``"s2"`` mode with its wrap-around. Every cell comes from ``sinklora.sf_attn.dense_mask``.

    python bench/plot_pattern.py [--n 32] [--group-size 8] [--num-sink 4] [--out PNG]
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from sinklora.sf_attn import dense_mask  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Cell kinds, in colormap order.
KINDS = ("hidden", "own group", "sink", "s2 wrap (future leak)")
COLORS = ("#f4f4f4", "#3b6fb6", "#e8902a", "#d62728")


def head_masks(n, group_size, num_sink, mode):
    """``[2, n, n]`` int cell kinds (indices into ``KINDS``) for head 0 (unshifted) and head 1
    (shifted)."""
    def mask(sinks):  # two query heads, the last one shifted
        return dense_mask(n, 2, group_size=group_size, num_sink=sinks, shift_heads=1, mode=mode)

    visible, without_sinks = mask(num_sink), mask(0)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    kinds = torch.zeros(2, n, n, dtype=torch.long)
    kinds[without_sinks] = 1
    kinds[visible & ~without_sinks] = 2
    kinds[visible & future] = 3
    return kinds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--num-sink", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "sf_attn_pattern.png")
    args = parser.parse_args()

    sf = head_masks(args.n, args.group_size, args.num_sink, "sf")
    s2 = head_masks(args.n, args.group_size, args.num_sink, "s2")
    g, half = args.group_size, args.group_size // 2
    panels = [
        (sf[0], f"unshifted head (both modes)\ngroups [0, {g}), [{g}, {2 * g}), ..."),
        (sf[1], f'shifted head, mode="sf" (SF-Attn)\ngroups [0, {half}), [{half}, {half + g}), '
                f"..., no wrap"),
        (s2[1], f'shifted head, mode="s2" (LongLoRA)\nroll by -{half}: queries < {half} see '
                f"the last {half} keys"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 5.6))
    cmap = ListedColormap(COLORS)
    for ax, (kinds, title) in zip(axes, panels):
        ax.imshow(kinds.numpy(), cmap=cmap, vmin=0, vmax=len(KINDS) - 1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ticks = list(range(0, args.n, half))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticks([x - 0.5 for x in range(args.n + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(args.n + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
    fig.legend(handles=[Patch(color=c, label=k) for c, k in zip(COLORS, KINDS)],
               loc="lower center", ncol=len(KINDS), frameon=False)
    fig.suptitle(f"SF-Attn pattern: N={args.n}, group_size={g}, num_sink={args.num_sink}")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
