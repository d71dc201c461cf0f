"""Clustering rules on constructed "perfect students": which rule keeps exactly the teacher's neurons?

No training: every student is built to hold the teacher's neurons exactly, so the only thing
measured is the clustering rule (shared/reference/expand-and-cluster.md, section 10's table and
section 11, item 2).

Construction, per cell (d_in, debris scale s) and seed:
  * teacher: r = 4 tanh neurons, [w; b] entries ~ N(0, 1) in d_in + 1 dimensions, outgoing
    weights a* ~ N(0, 1);
  * N = 10 students of width 16: each holds the 4 teacher neurons in a random order with random
    sign flips (the outgoing weight flips with the sign: tanh is odd), one of them duplicated
    with outgoing weights a₁ + a₂ = a* (a₁ = u·a*, u ~ U(0.2, 0.8)), and 11 debris neurons with
    [w; b] ~ N(0, s²) and outgoing weight 0 (``--debris-output`` sets a nonzero scale instead);
  * rows are canonicalised with ecdist's tanh symmetry class and clustered with
    ``ecdist.cluster.cluster_layer`` (γ = 0.5, exact scipy backend).

Rules compared (a rule "succeeds" when it keeps exactly 4 clusters and each teacher neuron is
the neuron collapsed from one of them, 1 − |cos| < 1e-12):
  * ``stable``            — ecdist's default rule, β = π/3, no contribution weights;
  * ``stable_weights``    — the same with the pipeline's contribution weights
                            (‖a‖ × std of tanh(wᵀx + b) over 2,000 Gaussian inputs; rows below
                            1e-3 of the largest are dropped before linkage);
  * ``reference_pi6``     — the authors' rule (plateau cut, ≥ ⌊γN⌋ neurons, median-angle filter)
                            with β = π/6, their code default and the setting of section 11;
  * ``reference_pi3``     — the authors' rule with β = π/3, their MNIST setting;
  * ``reference_pi6_weights`` — the authors' rule at β = π/6 after ecdist's negligible-neuron
                            drop (what ``Config(cluster_rule="reference")`` does by default).
``stable_weights`` is what ``ecdist.recover`` does with its default Config.
Seeds: ``numpy.random.default_rng([d_in, round(1000·s), round(1e4·debris_output), seed])`` with
seed = 0..19, so each cell is reproducible on its own.

Run:  python benchmarks/cluster_rules.py            (~1 min on 2 shared cores)
Out:  benchmarks/results/cluster_rules.json and .png
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import _common
import numpy as np
import torch

from ecdist import activations
from ecdist.cluster import cluster_layer
from ecdist.reconstruct import collapse

R_TEACHER = 4
N_STUDENTS = 10
WIDTH = 16
GAMMA = 0.5
D_INS = (2, 5, 20)
SCALES = (0.01, 0.1, 1.0)
N_SEEDS = 20
N_CONTRIB = 2000  # Gaussian inputs for the contribution weights
MATCH = 1e-12  # 1 − |cos| below which a collapsed neuron is the teacher's
RULES = {
    "stable": dict(rule="stable", beta=math.pi / 3, weighted=False),
    "stable_weights": dict(rule="stable", beta=math.pi / 3, weighted=True),
    "reference_pi6": dict(rule="reference", beta=math.pi / 6, weighted=False),
    "reference_pi3": dict(rule="reference", beta=math.pi / 3, weighted=False),
    "reference_pi6_weights": dict(rule="reference", beta=math.pi / 6, weighted=True),
}
LABELS = {
    "stable": "stable (no weights)",
    "stable_weights": "stable + weights (= recover())",
    "reference_pi6": "reference β=π/6 (authors)",
    "reference_pi3": "reference β=π/3",
    "reference_pi6_weights": "reference β=π/6 + weights",
}
ACT = activations.get("tanh")


def perfect_students(d_in: int, scale: float, debris_output: float, seed: int):
    """Rows (N·width, d_in+1) of [w; b], outgoing (N·width,), student ids, and the teacher (r, d_in+1)."""
    rng = np.random.default_rng([d_in, round(1000 * scale), round(1e4 * debris_output), seed])
    teacher = rng.standard_normal((R_TEACHER, d_in + 1))
    a_star = rng.standard_normal(R_TEACHER)
    n_debris = WIDTH - R_TEACHER - 1
    vecs, outs, sids = [], [], []
    for s in range(N_STUDENTS):
        dup = rng.integers(R_TEACHER)
        u = rng.uniform(0.2, 0.8)
        v = np.vstack([teacher, teacher[dup]])
        a = np.append(a_star, (1 - u) * a_star[dup])
        a[dup] *= u
        sign = rng.choice([-1.0, 1.0], size=R_TEACHER + 1)
        v, a = v * sign[:, None], a * sign
        v = np.vstack([v, scale * rng.standard_normal((n_debris, d_in + 1))])
        a = np.append(a, debris_output * rng.standard_normal(n_debris))
        order = rng.permutation(WIDTH)
        vecs.append(v[order])
        outs.append(a[order])
        sids.append(np.full(WIDTH, s))
    return np.vstack(vecs), np.concatenate(outs), np.concatenate(sids), teacher


def contributions(vectors: np.ndarray, outgoing: np.ndarray, d_in: int) -> np.ndarray:
    """‖outgoing‖ × std of the neuron's activation on Gaussian inputs (as ``StudentPack.layer_neurons``)."""
    X = np.random.default_rng(0).standard_normal((N_CONTRIB, d_in))
    H = ACT.fn(torch.as_tensor(np.hstack([X, np.ones((N_CONTRIB, 1))]) @ vectors.T)).numpy()
    return H.std(axis=0) * np.abs(outgoing)


def evaluate(d_in: int, scale: float, debris_output: float, seed: int) -> dict[str, dict]:
    vectors, outgoing, sids, teacher = perfect_students(d_in, scale, debris_output, seed)
    can = ACT.symmetry.canonicalize(vectors, outgoing[:, None], ACT.linear_coef)
    contrib = contributions(vectors, outgoing, d_in)
    losses = {s: float(s) for s in range(N_STUDENTS)}  # a fixed ranking of the (all exact) students
    out = {}
    for name, spec in RULES.items():
        cl = cluster_layer(
            can.vectors, sids, GAMMA, spec["beta"], backend="scipy", rule=spec["rule"],
            weights=contrib if spec["weighted"] else None, n_students=N_STUDENTS,
        )
        col = collapse(can.vectors, sids, cl.labels, losses, None)
        if len(col.vectors):
            D = ACT.symmetry.distance(teacher, col.vectors)  # (r, K)
            found = int((D.min(axis=1) < MATCH).sum())
        else:
            found = 0
        k = cl.n_clusters
        out[name] = {"kept": k, "teacher_found": found, "success": bool(k == R_TEACHER and found == R_TEACHER)}
    return out


def run(n_seeds: int, debris_outputs: list[float]) -> dict:
    cells = []
    for debris_output in debris_outputs:
        for d_in in D_INS:
            for scale in SCALES:
                per_seed = [evaluate(d_in, scale, debris_output, seed) for seed in range(n_seeds)]
                cell = {"d_in": d_in, "debris_scale": scale, "debris_output": debris_output, "n_seeds": n_seeds, "rules": {}}
                for name in RULES:
                    kept = [p[name]["kept"] for p in per_seed]
                    cell["rules"][name] = {
                        "exactly_4": sum(k == R_TEACHER for k in kept),
                        "success": sum(p[name]["success"] for p in per_seed),
                        "kept_min": min(kept),
                        "kept_max": max(kept),
                        "kept_mean": float(np.mean(kept)),
                        "kept": kept,
                        "teacher_found": [p[name]["teacher_found"] for p in per_seed],
                    }
                cells.append(cell)
                summary = "  ".join(
                    f"{n}: {cell['rules'][n]['exactly_4']}/{n_seeds} ({cell['rules'][n]['kept_min']}–{cell['rules'][n]['kept_max']})"
                    for n in RULES
                )
                print(f"debris out {debris_output:g}  d_in {d_in:>2}  s {scale:<4g}  {summary}", flush=True)
    totals = {}
    for debris_output in debris_outputs:
        sub = [c for c in cells if c["debris_output"] == debris_output]
        totals[f"{debris_output:g}"] = {
            name: {
                "exactly_4": sum(c["rules"][name]["exactly_4"] for c in sub),
                "success": sum(c["rules"][name]["success"] for c in sub),
                "cases": sum(c["n_seeds"] for c in sub),
            }
            for name in RULES
        }
    return {"cells": cells, "totals_by_debris_output": totals}


def plot(data: dict, path: Path) -> None:
    plt = _common.pyplot()

    outs = sorted({c["debris_output"] for c in data["cells"]})
    fig, axes = plt.subplots(len(outs), 2, figsize=(14, 4.2 * len(outs)), squeeze=False)
    names = list(RULES)
    colors = {"stable": "C0", "stable_weights": "C2", "reference_pi6": "C3", "reference_pi3": "C1",
              "reference_pi6_weights": "C4"}
    for row, dout in zip(axes, outs):
        cells = [c for c in data["cells"] if c["debris_output"] == dout]
        x = np.arange(len(cells))
        wbar = 0.8 / len(names)
        for j, name in enumerate(names):
            frac = [c["rules"][name]["success"] / c["n_seeds"] for c in cells]
            row[0].bar(x + (j - (len(names) - 1) / 2) * wbar, frac, wbar, label=LABELS[name], color=colors[name])
            mean = np.array([c["rules"][name]["kept_mean"] for c in cells])
            lo = mean - np.array([c["rules"][name]["kept_min"] for c in cells])
            hi = np.array([c["rules"][name]["kept_max"] for c in cells]) - mean
            row[1].errorbar(x + (j - (len(names) - 1) / 2) * wbar, mean, yerr=[lo, hi], fmt="o", ms=4,
                            capsize=2, label=LABELS[name], color=colors[name])
        labels = [f"d={c['d_in']}\ns={c['debris_scale']:g}" for c in cells]
        for ax in row:
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8)
        row[0].set_ylim(0, 1.05)
        row[0].set_ylabel("fraction of seeds: exactly 4, all exact")
        row[0].set_title(f"success per cell (debris outgoing scale {dout:g})")
        row[1].axhline(R_TEACHER, color="grey", ls="--", lw=0.8)
        row[1].set_ylabel("clusters kept (mean, min–max)")
        row[1].set_title("clusters kept (teacher has 4)")
        row[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=N_SEEDS, help="seeds per cell (default 20)")
    p.add_argument("--debris-output", type=float, nargs="+", default=[0.0, 0.01],
                   help="scales of the debris neurons' outgoing weights; 0 is the reference construction "
                        "(default: 0 and 0.01, the second makes contribution weights less than a free pass)")
    p.add_argument("--out", type=Path, default=_common.RESULTS / "cluster_rules.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = run(args.seeds, args.debris_output)
    result = {
        "benchmark": "cluster_rules",
        "description": __doc__.split("\n\n")[0],
        "setup": {
            "teacher_neurons": R_TEACHER, "activation": "tanh", "n_students": N_STUDENTS, "student_width": WIDTH,
            "gamma": GAMMA, "d_in": list(D_INS), "debris_scales": list(SCALES), "n_seeds": args.seeds,
            "debris_outputs": args.debris_output, "match_threshold": MATCH,
            "rules": {k: {**v, "label": LABELS[k]} for k, v in RULES.items()},
        },
        **data,
        "wall_s": time.perf_counter() - t0,
        "machine": _common.machine_info(),
    }
    _common.write_json(args.out, result)
    plot(data, args.out.with_suffix(".png"))
    for dout, tot in data["totals_by_debris_output"].items():
        print(f"debris outgoing scale {dout}: " + ", ".join(
            f"{n} {t['success']}/{t['cases']}" for n, t in tot.items()))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
