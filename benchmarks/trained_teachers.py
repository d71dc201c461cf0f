"""Recovery of teachers trained on real data: digits (64-r-10) and MNIST-1D (40-r-10).

Teachers come from ``ecdist.teachers.train_on`` (seed 0; logits are the outputs). Inputs that
never vary in the training data (3 border pixels of digits) are masked: their weights are not
identifiable, so the teacher is restricted to the varying inputs (``teachers.masked``). Queries:
"augmented" = the training inputs, the same with one-signed uniform noise (x + U[0,1] and
x + U[−1,0]) and as many 2×2 grid compositions of different images (1-D: 2 segments), the
query sets of the follow-up paper (arXiv 2511.20312); "plain" = the training inputs alone.
Students: ρ·r wide (ρ = 2), N = 10, Levenberg–Marquardt (``lm_max_params`` raised so that every
student here is trained by LM; on a GPU with ``--device cuda``).

Reported per teacher: recovered width, overhead (recovered − r)/r, worst and median 1 − |cos|
over teacher neurons (nearest recovered neuron, symmetry-aware), and the functional relative
MSE on the held-out test images.

Part (c), deep teachers (``--deep digits:16-16 mnist1d:12-12-12``), reports the recovered width,
overhead and worst 1 − |cos| of every layer.

Part (d), plain vs augmented queries, uses a teacher with more parameters than images
(digits 64-32-10: 2,410 parameters on 1,438 training images).

Run:  python benchmarks/trained_teachers.py [--quick] [--device cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common
import numpy as np

import ecdist
from ecdist import queries, teachers

ACTIVATIONS = ("g", "tanh", "sigmoid", "softplus", "relu")
RHO, N_STUDENTS = 2, 10


def query_set(t: teachers.TrainedTeacher, kind: str, seed: int) -> np.ndarray:
    X = t.X_train
    if kind == "plain":
        return X
    grid = queries.grid_composition(X, len(X), seed=seed, shape=t.data.shape, grid=2)
    return np.vstack([X, queries.signed_noise(X, seed=seed), grid])


def run_one(dataset: str, hidden: int | list[int], act: str, kind: str, device: str, threads: int) -> dict:
    """One teacher [d_in, *hidden, 10]: train it, recover it, compare layer by layer."""
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    t0 = time.perf_counter()
    d_in = 64 if dataset == "digits" else 40
    t = teachers.train_on(dataset, [d_in, *hidden, 10], act, seed=0)
    mask = queries.input_mask(t.X_train)
    tm = teachers.masked(t, mask, fill=t.X_train[0])
    Q = query_set(t, kind, seed=1)[:, mask]
    widths = [RHO * r for r in hidden]
    sizes = [int(mask.sum()), *widths, 10]
    P = sum((i + 1) * o for i, o in zip(sizes[:-1], sizes[1:]))
    cfg = ecdist.Config(activation=act, student_widths=widths, n_students=N_STUDENTS, seed=0, backend="local",
                        device=device, threads=threads, lm_max_params=max(2500, P))
    res = ecdist.recover(tm, Q, cfg)
    rep = ecdist.compare(res.network, tm, act, X=t.X_test[:, mask])
    dists = [np.asarray(d) for d in rep.weight_distance] or [np.array([np.nan])]
    row = {
        "dataset": dataset, "activation": act, "r": hidden[0] if len(hidden) == 1 else hidden, "queries": kind,
        "n_queries": len(Q), "masked_inputs": int((~mask).sum()), "teacher_test_accuracy": t.test_accuracy,
        "teacher_train_seconds": t.train_seconds,
        "student_width": widths[0] if len(widths) == 1 else widths, "params_per_student": P,
        "recovered": res.layer_sizes[0] if len(hidden) == 1 else res.layer_sizes,
        "overhead": (res.layer_sizes[0] - hidden[0]) / hidden[0] if len(hidden) == 1
        else [(k - r) / r for k, r in zip(res.layer_sizes, hidden)],
        "worst_1_minus_cos": float(max(d.max() for d in dists)),
        "median_1_minus_cos": float(np.median(np.concatenate(dists))),
        "worst_1_minus_cos_per_layer": [float(d.max()) for d in dists],
        "functional_rel_mse_test": rep.functional_mse,
        "students_median_rel_mse": float(np.median(np.asarray(res.students.column("rel_loss")))),
        "rule": res.layers[-1].rule, "seconds": time.perf_counter() - t0,
    }
    arch = "-".join(map(str, hidden))
    print(f"{dataset:8s} {act:8s} r={arch:>8s} {kind:9s}: {row['recovered']} "
          f"({row['overhead']}) worst {row['worst_1_minus_cos']:.1e} fmse {row['functional_rel_mse_test']:.1e} "
          f"[{row['seconds']:.0f} s]", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tanh digits r=8 and the plain/augmented pair only")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--activations", nargs="+", default=list(ACTIVATIONS))
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-plain", action="store_true", help="only the augmented-query grid (no part d)")
    ap.add_argument("--deep", nargs="+", default=[], metavar="DATASET:W-W[-W]",
                    help="deep teachers only (part c), e.g. digits:16-16 mnist1d:12-12-12")
    args = ap.parse_args()
    rows = []
    cases = [("digits", 8, "tanh")] if args.quick else [
        (ds, r, a) for ds in args.datasets for r in args.widths for a in args.activations]  # narrow first
    name = "trained_teachers_quick" if args.quick else "trained_teachers"
    path = args.out or _common.RESULTS / f"{name}.json"
    if args.deep:
        cases = [(d.split(":")[0], [int(w) for w in d.split(":")[1].split("-")], a)
                 for d in args.deep for a in args.activations]
        args.skip_plain = True
    for ds, r, a in cases:
        rows.append(run_one(ds, r, a, "augmented", args.device, args.threads))
        _common.write_json(path.with_suffix(".partial.json"), {"shallow": rows})  # a killed run keeps its rows
    if args.skip_plain:
        _common.write_json(path, {"benchmark": "trained_teachers", "machine": _common.machine_info(),
                                  "deep" if args.deep else "shallow": rows})
        return 0
    plain = [run_one("digits", 32 if not args.quick else 8, "tanh", "plain", args.device, args.threads)]
    aug = [x for x in rows if x["dataset"] == "digits" and x["activation"] == "tanh" and x["r"] == plain[0]["r"]]
    if not aug:
        aug = [run_one("digits", plain[0]["r"], "tanh", "augmented", args.device, args.threads)]
    shallow = list(rows)
    out = {
        "benchmark": "trained_teachers",
        "machine": _common.machine_info(),
        "settings": {"rho": RHO, "n_students": N_STUDENTS, "device": args.device},
        "shallow": shallow,
        "plain_vs_augmented": {"plain": plain[0], "augmented": aug[0]},
        "summary": {
            "teachers": len(shallow),
            "exact_width": sum(x["recovered"] == x["r"] for x in shallow),
            "overhead_at_most_5pct": sum(x["overhead"] <= 0.05 for x in shallow),
            "all_neurons_within_1e-3": sum(x["worst_1_minus_cos"] < 1e-3 for x in shallow),
        },
    }
    _common.write_json(path, out)
    plot(out, path.with_suffix(".png"))
    print(out["summary"])
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["shallow"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{x['dataset'][:2]} {x['activation']} {x['r']}" for x in rows]
    ax1.bar(range(len(rows)), [100 * x["overhead"] for x in rows])
    ax1.axhline(5, color="k", ls=":", lw=1)
    ax1.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax1.set_ylabel("layer-size overhead (%)")
    ax2.bar(range(len(rows)), [np.log10(max(x["worst_1_minus_cos"], 1e-17)) for x in rows])
    ax2.axhline(-3, color="k", ls=":", lw=1)
    ax2.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax2.set_ylabel("log10 worst 1 − |cos|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
