"""The planner's frontier plot (``featcache plan`` writes it as ``frontier.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_frontier(result: Any, path: Path) -> None:
    """PNG: measured cosine (dots; the frontier as a line) and the product-rule estimate
    (crosses) against MiB per tile (log), the budget and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = result.candidates
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mib = [c.bytes_per_tile / 2**20 for c in cands]
    ax.scatter(mib, [c.cosine for c in cands], s=14, c="grey", label="measured")
    ax.scatter(
        mib, [c.estimate for c in cands], s=14, marker="x", c="C1", label="estimate (product rule)"
    )
    front = sorted((c for c in cands if c.on_frontier), key=lambda c: c.bytes_per_tile)
    ax.plot([c.bytes_per_tile / 2**20 for c in front], [c.cosine for c in front], "o-", c="C0")
    for c in front:
        ax.annotate(c.label, (c.bytes_per_tile / 2**20, c.cosine), fontsize=6)
    ax.axvline(result.budget / 2**20, ls="--", c="C3", label="budget")
    if result.best is not None:
        b = result.best
        ax.scatter([b.bytes_per_tile / 2**20], [b.cosine], s=80, marker="*", c="C3", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("MiB per tile (all teachers)")
    ax.set_ylabel("measured mean token cosine vs online teacher")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["plot_frontier"]
