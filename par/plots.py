"""Training-dynamics figure: CLIP loss, PAR distance terms, CA and ASR against step (PAR's Fig. 4, top row)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def plot_training(metrics: str | os.PathLike, out: str | os.PathLike,
                  distance_threshold: Optional[float] = None) -> Optional[Path]:
    """Writes a PNG of the metrics in a run's JSONL log; returns None if the log is empty.

    ``distance_threshold`` (PAR's tau) is drawn on the embedding-distance panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    if not records:
        return None
    panels = [
        ("loss", ["clip_loss", "loss"], "loss"),
        ("embedding distance to the frozen model", ["image_distance", "text_distance"], "mean squared L2"),
        ("clean accuracy", ["ca"], "CA"),
        ("attack success rate", ["asr"], "ASR"),
    ]
    panels = [p for p in panels if any(k in r for r in records for k in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys, ylabel) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        if title.startswith("embedding") and distance_threshold is not None:
            ax.axhline(distance_threshold, color="gray", linestyle="--", label=f"threshold {distance_threshold}")
        if ylabel in ("CA", "ASR"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
