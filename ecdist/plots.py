"""Figures of a recovery (matplotlib, imported here only): alignment and loss curves."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .metrics import Comparison
    from .pipeline import Recovery


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def students_per_neuron(layer) -> np.ndarray:
    """For each recovered neuron of ``layer`` (a LayerResult), the students in the cluster it came from;
    the clusters table also lists the candidates the fine-tune pruned (neuron −1), which have none."""
    neuron, n_students = (np.asarray(layer.clusters.column(c)) for c in ("neuron", "n_students"))
    out = np.zeros(layer.width, dtype=np.int64)
    out[neuron[neuron >= 0]] = n_students[neuron >= 0]
    return out


def plot_recovery(result: "Recovery", path: str | Path, comparison: "Comparison | None" = None) -> Path:
    """Left: per teacher neuron, log10 of 1 − |cos| to the nearest recovered neuron (or, with
    no teacher weights, each kept cluster's size); right: every student's relative MSE."""
    plt = pyplot()
    comparison = comparison if comparison is not None else result.comparison
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if comparison is not None and comparison.weight_distance:
        for l, dw in enumerate(comparison.weight_distance):
            dw = np.clip(np.asarray(dw, dtype=float), 1e-17, None)
            ax1.semilogy(np.arange(1, len(dw) + 1), dw, "o", label=f"layer {l + 1}")
        ax1.axhline(1e-6, color="grey", ls="--", lw=0.8)
        ax1.set_xlabel("teacher neuron")
        ax1.set_ylabel("1 − |cos| to nearest recovered neuron")
        ax1.set_title(f"alignment: widths {comparison.layer_sizes} vs teacher {comparison.teacher_sizes}")
        ax1.legend()
    else:
        for layer in result.layers:
            ax1.bar(np.arange(layer.width) + 0.4 * (layer.index - 1), students_per_neuron(layer), width=0.4,
                    label=f"layer {layer.index}")
        ax1.set_xlabel("recovered neuron")
        ax1.set_ylabel("students in its cluster")
        ax1.set_title(f"recovered widths {result.layer_sizes}")
    hist = np.clip(result.history, 1e-34, None)
    ax2.semilogy(result.history_steps, hist, lw=0.8, alpha=0.7)
    ax2.axhline(result.final_rel_mse if result.final_rel_mse > 0 else 1e-34, color="k", ls="--", lw=1, label="recovered network")
    ax2.set_xlabel(f"{result.plan.get('optimizer', '')} step")
    ax2.set_ylabel("relative MSE")
    ax2.set_title(f"{hist.shape[1]} students")
    ax2.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
