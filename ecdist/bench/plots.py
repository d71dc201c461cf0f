"""Figures of the benchmarks (matplotlib through ``ecdist.plots.pyplot``, Agg backend), one PNG each."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..plots import pyplot


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # minor-tick labels of short log axes overlap
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path


def loglog_vs_m(ax: Any, title: str, unit: str) -> None:
    """Log-log axes of a clustering figure against the number of neuron vectors M."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("neuron vectors M")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8)


def students(res: dict[str, Any], path: Path) -> Path:
    """Students·epochs/s vs N and vs width (stacked and loop, ratio marked); the cost per student vs step size."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = res["stacked_vs_loop"]
    base = min(r["width"] for r in rows)
    n_w = max({r["N"] for r in rows}, key=lambda n: (len({r["width"] for r in rows if r["N"] == n}), n))
    for ax, key, sel, label in ((axes[0], "N", [r for r in rows if r["width"] == base], f"students N (width {base})"),
                                (axes[1], "width", [r for r in rows if r["N"] == n_w], f"student width (N = {n_w})")):
        sel = sorted(sel, key=lambda r: r[key])
        xs = [r[key] for r in sel]
        ax.loglog(xs, [r["stacked_students_epochs_per_s"] for r in sel], "o-", label="one stacked pack")
        ax.loglog(xs, [r["loop_students_epochs_per_s"] for r in sel], "s-", label="per-student loop")
        for r in sel:
            ax.annotate(f"×{r['ratio']:.1f}", (r[key], r["stacked_students_epochs_per_s"]), fontsize=8,
                        textcoords="offset points", xytext=(0, 5))
        ax.set_xlabel(label)
        ax.set_ylabel("students·epochs / s (Adam)")
        ax.legend(fontsize=8)
    ax = axes[2]
    for w, n in sorted({(r["width"], r["queries"]) for r in res["cost"]}):
        sel = sorted((r for r in res["cost"] if (r["width"], r["queries"]) == (w, n)),
                     key=lambda r: r["N"] * r["params_per_student"])
        ax.loglog([r["N"] * r["params_per_student"] for r in sel], [r["sample_params_per_s"] for r in sel], "o-",
                  label=f"784-{w}-10, n = {n:,}")
    ax.set_xlabel("work per step: students × parameters")
    ax.set_ylabel("sample·parameters / s")
    ax.set_title(f"cost per student on {res['device']}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def actors(res: dict[str, Any], path: Path) -> Path:
    """Students/s with one and two actors, per Ray setup, with the ratio."""
    plt = pyplot()
    modes = [m for m in ("local", "cluster") if m in res]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(modes))
    ax.bar(x - 0.2, [res[m]["one"]["students_per_s"] for m in modes], 0.4, label="1 actor")
    ax.bar(x + 0.2, [res[m]["two"]["students_per_s"] for m in modes], 0.4, label="2 actors")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{m}: ×{res[m]['ratio']:.2f}" for m in modes])
    ax.set_ylabel(f"students / s ({res['lm_iterations']} LM iterations)")
    ax.set_title(f"{res['students']} students of width {res['width']}, 1 CPU per actor", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def cluster(res: dict[str, Any], path: Path) -> Path:
    """Clustering time and peak memory vs M, log-log, per backend and dimension, with the fitted slopes."""
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows, fits = res["rows"], res.get("fits", {})
    for dim, ls in zip(sorted({r["dim"] for r in rows}), ("-", "--", ":")):
        for backend, color in (("scipy", "C3"), ("faiss", "C0")):
            pts = [(r["rows"], r[backend]) for r in rows if r["dim"] == dim and r.get(backend, {}).get("status") == "ok"]
            if not pts:
                continue
            ms = [p[0] for p in pts]
            f = fits.get(f"{backend}_d{dim}", {})
            slope = f"{f['time']['slope']:.2f}" if f.get("time") else "?"
            ax_t.plot(ms, [p[1]["time_s"] for p in pts], ls, marker="o", color=color,
                      label=f"{backend}, D = {dim} (slope {slope})")
            mem = [max(p[1]["peak_rss_mb"], 1e-1) for p in pts]
            ax_m.plot(ms, mem, ls, marker="o", color=color, label=f"{backend}, D = {dim}")
    loglog_vs_m(ax_t, "time of one clustering", "seconds")
    loglog_vs_m(ax_m, "peak memory of the step", "MB")
    return _save(fig, path)


def recovery(res: dict[str, Any], path: Path) -> Path:
    """End-to-end time vs teacher width and vs depth, split into training, clustering and the rest."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "width", "teacher"), (axes[1], "depth", "teacher")):
        rows = res[key]
        x = np.arange(len(rows))
        train = np.array([r.get("timings", {}).get("train", 0.0) for r in rows])
        clus = np.array([r.get("timings", {}).get("cluster", 0.0) for r in rows])
        total = np.array([r["seconds"] for r in rows])
        ax.bar(x, train, label="train students")
        ax.bar(x, clus, bottom=train, label="cluster")
        ax.bar(x, total - train - clus, bottom=train + clus, label="reconstruct, fine-tune, rest")
        for xi, r in zip(x, rows):
            mark = "✓" if r.get("success") else ("failed" if r["status"] == "failed" else str(r.get("layer_sizes")))
            ax.text(xi, r["seconds"], mark, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(["-".join(map(str, r["arch"])) for r in rows], fontsize=8)
        ax.set_xlabel(f"{label} ({res['activation']}; students ρ = {res['rho']}, N = {res['n_students']})")
        ax.set_ylabel("seconds")
        ax.set_title(f"recovery time vs teacher {key}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def quality(res: dict[str, Any], path: Path) -> Path:
    """Overhead and worst 1 − |cos| (first layer) vs ρ and vs N, one line per teacher."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for col, (sweep, key, xlabel) in enumerate(((res["rho_sweep"], "rho", f"ρ (N = {res['rho_sweep_n_students']})"),
                                                (res["n_sweep"], "n_students", f"students N (ρ = {res['n_sweep_rho']})"))):
        teachers = list(dict.fromkeys(_teacher_id(r) for r in sweep))
        for t in teachers:
            sel = [r for r in sweep if _teacher_id(r) == t and r["status"] == "ok"]
            xs = [r[key] for r in sel]
            axes[0, col].plot(xs, [r["overhead"][0] for r in sel], "o-", label=t)
            axes[1, col].semilogy(xs, [max(r["worst_1_minus_cos"][0], 1e-17) for r in sel], "o-", label=t)
        axes[0, col].axhline(0, color="grey", lw=0.6)
        axes[1, col].axhline(1e-4, color="grey", lw=0.6, ls="--")
        axes[1, col].set_xlabel(xlabel)
        axes[0, col].legend(fontsize=8)
    axes[0, 0].set_ylabel("width overhead (K − r)/r")
    axes[1, 0].set_ylabel("worst 1 − |cos|")
    return _save(fig, path)


def _teacher_id(r: dict[str, Any]) -> str:
    return f"{r['activation']}-{'-'.join(map(str, r['arch']))}-s{r['seed']}"
