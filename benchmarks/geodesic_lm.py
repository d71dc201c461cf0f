"""Levenberg–Marquardt with and without geodesic acceleration, on the same students.

Why ``Config.lm_geodesic`` defaults to "deep": the deep students of the trained-teacher
benchmark crawled along curved valleys under plain LM (MNIST-1D 40-24-24-24-10 tanh: 1e-16 to
3e-10 after 550 iterations, gaining 2–4× per 50). Transtrum–Sethna's acceleration adds half the
second-order correction to each step. Here, on small random teachers (Gaussian queries, seeded),
every case trains the same k students twice — plain and accelerated — with no restarts and no
stall rule, and records per student the iterations to relative MSE 1e-10 and 1e-16 (−1: never
within ``--iters``), the final loss, and the seconds per iteration (the acceleration costs three
forward passes and one backward per tried step). Shallow cases are included to show why they
stay plain: there plain LM is already quick and the acceleration only adds iterations.

Run:  python benchmarks/geodesic_lm.py [--quick] [--iters N] [--students K]
Out:  benchmarks/results/geodesic_lm.json and .png (``--out FILE`` elsewhere)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import _common
import numpy as np
import torch

import ecdist
from ecdist.bench.common import load_average
from ecdist.queries import Standardizer
from ecdist.students import LMOptions, StudentPack, fit_lm

# (activation, teacher widths, student widths, queries); teacher seed 22, query seed 1
CASES = [
    ("tanh", [6, 4, 3, 1], [6, 12, 9, 1], 600),
    ("tanh", [5, 4, 3, 1], [5, 8, 6, 1], 300),
    ("tanh", [8, 6, 4, 2], [8, 12, 8, 2], 800),
    ("tanh", [10, 5, 5, 5, 2], [10, 10, 10, 10, 2], 1000),
    ("softplus", [6, 4, 3, 1], [6, 8, 6, 1], 600),
    ("sigmoid", [6, 4, 3, 1], [6, 8, 6, 1], 600),
    ("g", [6, 4, 3, 1], [6, 12, 9, 1], 600),
    ("tanh", [10, 6, 1], [10, 12, 1], 500),
    ("relu", [10, 4, 1], [10, 8, 1], 800),
    ("g", [10, 4, 1], [10, 8, 1], 800),
]
LEVELS = (1e-10, 1e-16)


def run_case(act: str, teacher: list[int], student: list[int], n: int, k: int, iters: int) -> dict:
    net = ecdist.teachers.random_mlp(teacher, act, seed=22)
    X = ecdist.queries.gaussian(n, teacher[0], seed=1)
    Y = ecdist.teachers.query(net, X)
    X, Y = torch.as_tensor(Standardizer.fit(X)(X)), torch.as_tensor(Standardizer.fit(Y)(Y))
    opts = LMOptions(max_iter=iters, tol=1e-28, stall_window=10**6, restarts=0)
    row = {"activation": act, "teacher": teacher, "student": student, "queries": n, "students": k,
           "deep": len(student) > 3}
    for name, geodesic in (("plain", False), ("geodesic", True)):
        pack = StudentPack.init(student, act, list(range(k)), seed=0)
        history: list[np.ndarray] = []
        t0 = time.perf_counter()
        fit_lm(pack, X, Y, dataclasses.replace(opts, geodesic=geodesic),
               progress=lambda phase, i, total, losses: history.append(losses.copy()))
        seconds = time.perf_counter() - t0
        h = np.array(history)
        row[name] = {
            "final": pack.rel_loss.tolist(),
            **{f"iters_to_{lv:.0e}": [int(np.argmax(h[:, j] < lv)) + 1 if (h[:, j] < lv).any() else -1
                                      for j in range(k)] for lv in LEVELS},
            "seconds": seconds, "s_per_iteration": seconds / max(len(h), 1),
        }
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first two cases, 2 students, 100 iterations")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--students", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases, k, iters = (CASES[:2], 2, 100) if args.quick else (CASES, args.students, args.iters)
    rows = []
    for act, teacher, student, n in cases:
        row = run_case(act, teacher, student, n, k, iters)
        rows.append(row)
        print(f"{act:8s} {'-'.join(map(str, teacher)):12s} students {'-'.join(map(str, student)):14s}", flush=True)
        for name in ("plain", "geodesic"):
            r = row[name]
            print(f"    {name:8s} →1e-16 {r['iters_to_1e-16']}  final {' '.join(f'{v:.0e}' for v in r['final'])}  "
                  f"{r['s_per_iteration'] * 1e3:.1f} ms/iteration", flush=True)
    path = args.out or _common.RESULTS / ("geodesic_lm_quick.json" if args.quick else "geodesic_lm.json")
    out = {"benchmark": "geodesic_lm", "machine": _common.machine_info(), "load_average": load_average(),
           "iterations": iters, "command": "python benchmarks/geodesic_lm.py" + (" --quick" if args.quick else ""),
           "rows": rows}
    _common.write_json(path, out)
    plot(out, path.with_suffix(".png"))
    return 0


def plot(out: dict, path: Path) -> None:
    """Per case: the students' final relative MSE, plain and accelerated (log scale, one dot each)."""
    plt = _common.pyplot()

    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, r in enumerate(rows):
        for dx, name, color in ((-0.15, "plain", "C3"), (0.15, "geodesic", "C0")):
            vals = np.maximum(r[name]["final"], 1e-33)
            ax.scatter(np.full(len(vals), i + dx), vals, color=color, s=16, label=name if i == 0 else None)
    ax.axhline(1e-16, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"{r['activation']}\n{'-'.join(map(str, r['student']))}" for r in rows],
                  fontsize=7)
    ax.set_ylabel(f"relative MSE after {out['iterations']} LM iterations")
    ax.set_title("Levenberg–Marquardt, plain vs geodesic acceleration (same students; deep cases first)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
