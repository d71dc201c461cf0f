"""Cost of one Levenberg–Marquardt normal-equation build: the structured JᵀJ against JᵀJ from J.

``StudentPack.normal_equations`` never forms the Jacobian J (n·d_out rows, P columns): the
weight block of layers l, l' is one GEMM over queries of Cₙ = Σ_o δˡᵀδˡ' by ãˡ ⊗ ãˡ', with
symmetric pairs on the diagonal blocks (the one-hidden-layer path also factors out AᵀA). The
reference here is what the structured paths replace, ``normal_equations_from_jacobian``: J from
the closed-form ``jacobian`` in query chunks, JᵀJ and Jᵀr by batched GEMM — d_out times more flops for the weight blocks.

Cases: the students of ``trained_teachers.py`` (ρ = 2, 10 outputs; digits with its 2 constant
border pixels masked → 62 inputs): shallow digits r = 16, deep digits 64-16-16-10 and MNIST-1D
40-12-12-12-10; and the network that reconstruction fine-tunes for a ReLU MNIST-1D r = 16 teacher
(16 neurons with the affine skip path, which the one-hidden-layer path also sums without J).
Each case: k students, n Gaussian queries, the two sides alternated ``--repeats`` times (each
side's fastest kept, all runs in the JSON), float64, one torch thread on the CPU.
Also the structured build once at the trained-teacher query count (digits 5,752, MNIST-1D
16,000): seconds per student and LM iteration; and the largest relative difference between the
two results.

``--chunks`` measures instead what ``LMOptions.chunk_elems`` (work elements per student and query
chunk) costs: the structured build of each case at its trained-teacher query count, with query chunks
of 2¹⁸ … 2²¹ elements alternated. Small chunks make a long, thin GEMM (few queries inner) whose
output block is read and written once per chunk.

Run:  python benchmarks/normal_equations.py [--quick] [--device cuda] [--chunks]
Out:  benchmarks/results/normal_equations.json and .png (``--chunks``: normal_equations_chunks.*;
      ``--out FILE`` elsewhere)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common
import torch

from ecdist.bench.common import alternated, load_average
from ecdist.students import StudentPack

# (name, widths, queries of the trained-teacher benchmark, affine skip path)
CASES = [
    ("digits 62-32-10 (r=16)", [62, 32, 10], 5752, False),
    ("digits 62-32-32-10 (deep 16-16)", [62, 32, 32, 10], 5752, False),
    ("MNIST-1D 40-24-24-24-10 (deep 12-12-12)", [40, 24, 24, 24, 10], 16000, False),
    ("MNIST-1D 40-16-10 + skip (ReLU reconstruction)", [40, 16, 10], 16000, True),
]


def timer(fn, device: str):
    """A measure for ``alternated``: runs ``fn`` and returns its seconds (the GPU synchronised on both sides)."""
    def run() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    return run


def measure(
    widths: list[int], n: int, k: int, repeats: int, device: str, explicit: bool = True, skip: bool = False
) -> dict:
    """Both builds on k students and n queries, alternated; ``explicit=False``: the structured one alone.

    ``skip``: ReLU networks with the affine path, as reconstruction fine-tunes them for the
    even+linear classes (its prune refits one such network per tried removal).
    """
    pack = StudentPack.init(widths, "relu" if skip else "tanh", list(range(k)), seed=0, device=device)
    if skip:
        S = 0.1 * torch.randn(k, widths[0] * widths[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        pack = StudentPack(torch.cat([pack.theta, S.to(device)], 1), widths, "relu", list(range(k)), skip=True)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, widths[0], generator=gen, dtype=torch.float64).to(device)
    Y = torch.randn(n, widths[-1], generator=gen, dtype=torch.float64).to(device)
    results = {}

    def timed(name, fn):
        return timer(lambda: results.__setitem__(name, fn()), device)

    if not explicit:
        return {"structured_best_s": min(alternated(repeats, timed("structured", lambda: pack.normal_equations(X, Y)))[0])}
    structured, from_j = alternated(
        repeats, timed("structured", lambda: pack.normal_equations(X, Y)), timed("explicit", lambda: pack.normal_equations_from_jacobian(X, Y))
    )
    (A, a), (B, b) = results["structured"], results["explicit"]
    rel = max(((A - B).abs().max() / B.abs().max()).item(), ((a - b).abs().max() / b.abs().max()).item())
    return {
        "widths": widths, "params_per_student": pack.n_params, "students": k, "queries": n,
        "structured_s": structured, "explicit_s": from_j,
        "structured_best_s": min(structured), "explicit_best_s": min(from_j),
        "ratio": min(from_j) / min(structured),
        "max_rel_difference": rel,
    }


CHUNKS = (2**18, 2**19, 2**20, 2**21)
# the sweep's cases: the largest shallow students of trained_teachers.py (r = 32) and the deep ones
CHUNK_CASES = [("digits 62-64-10 (r=32)", [62, 64, 10], 5752), ("MNIST-1D 40-64-10 (r=32)", [40, 64, 10], 16000)] + [
    (name, widths, n) for name, widths, n, skip in CASES if len(widths) > 3]


def chunk_sweep(k: int, repeats: int, device: str, quick: bool) -> list[dict]:
    """Seconds per structured build of k g students for each chunk size in CHUNKS, alternated, per case."""
    rows = []
    for name, widths, n_full in CHUNK_CASES:
        n = 200 if quick else n_full
        pack = StudentPack.init(widths, "g", list(range(k)), seed=0, device=device)
        gen = torch.Generator().manual_seed(1)
        X = torch.randn(n, widths[0], generator=gen, dtype=torch.float64).to(device)
        Y = torch.randn(n, widths[-1], generator=gen, dtype=torch.float64).to(device)

        times = alternated(repeats, *(timer(lambda ce=ce: pack.normal_equations(X, Y, chunk_elems=ce), device)
                                      for ce in CHUNKS))
        best = {ce: min(t) for ce, t in zip(CHUNKS, times)}
        rows.append({"case": name, "widths": widths, "params_per_student": pack.n_params, "students": k,
                     "queries": n, "seconds": {str(ce): t for ce, t in zip(CHUNKS, times)},
                     "best_s": {str(ce): b for ce, b in best.items()},
                     "speedup_over_2_18": {str(ce): best[CHUNKS[0]] / b for ce, b in best.items()}})
        print(f"{name:42s} " + "  ".join(f"2^{ce.bit_length() - 1}: {b:6.2f} s" for ce, b in best.items()), flush=True)
    return rows


def plot_chunks(out: dict, path: Path) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r in out["rows"]:
        ax.plot([int(c).bit_length() - 1 for c in r["best_s"]], list(r["speedup_over_2_18"].values()), "o-",
                label=f"{r['case']} (P={r['params_per_student']}, n={r['queries']})")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("log₂ chunk_elems (work elements per student and query chunk)")
    ax.set_ylabel("speed-up of one JᵀJ build over 2¹⁸")
    ax.set_title(f"normal equations vs chunk size, float64, {out['device']}"
                 f" ({'1 thread' if out['device'] == 'cpu' else 'GPU'}, {out['rows'][0]['students']} students)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer queries and one repeat")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--students", type=int, default=4)
    ap.add_argument("--queries", type=int, default=1000, help="queries per build (the cost is linear in it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--chunks", action="store_true", help="the chunk-size sweep instead (see above)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.chunks:
        name = "normal_equations_chunks_quick.json" if args.quick else "normal_equations_chunks.json"
        path = args.out or _common.RESULTS / name
        out = {"benchmark": "normal_equations_chunks", "machine": _common.machine_info(), "device": args.device,
               "load_average": load_average(),
               "rows": chunk_sweep(args.students, 1 if args.quick else args.repeats, args.device, args.quick)}
        _common.write_json(path, out)
        plot_chunks(out, path.with_suffix(".png"))
        return 0
    n, repeats = (200, 1) if args.quick else (args.queries, args.repeats)
    rows = []
    for name, widths, n_full, skip in CASES:
        row = {"case": name, "skip": skip, **measure(widths, n, args.students, repeats, args.device, skip=skip)}
        if not args.quick:
            full = measure(widths, n_full, args.students, 1, args.device, explicit=False, skip=skip)
            row |= {"trained_teacher_queries": n_full,
                    "s_per_student_iteration": full["structured_best_s"] / args.students}
        rows.append(row)
        per = f"; {row['s_per_student_iteration']:.2f} s per student-iteration at n={n_full}" if not args.quick else ""
        print(f"{name:42s} P={row['params_per_student']:5d}  structured {row['structured_best_s']:7.2f} s  "
              f"explicit {row['explicit_best_s']:7.2f} s  ×{row['ratio']:.1f}  (rel. diff "
              f"{row['max_rel_difference']:.1e}{per})", flush=True)
    path = args.out or _common.RESULTS / ("normal_equations_quick.json" if args.quick else "normal_equations.json")
    out = {"benchmark": "normal_equations", "machine": _common.machine_info(), "device": args.device,
           "load_average": load_average(), "rows": rows}
    _common.write_json(path, out)
    plot(out, path.with_suffix(".png"))
    return 0


def plot(out: dict, path: Path) -> None:
    plt = _common.pyplot()

    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = range(len(rows))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["explicit_best_s"] for r in rows], w, label="JᵀJ from J", color="C3")
    ax.bar([i + w / 2 for i in x], [r["structured_best_s"] for r in rows], w, label="structured", color="C0")
    for i, r in enumerate(rows):
        ax.annotate(f"×{r['ratio']:.1f}", (i + w / 2, r["structured_best_s"]), ha="center", va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"{r['case']}\nP={r['params_per_student']}" for r in rows], fontsize=8)
    ax.set_ylabel(f"s per build ({rows[0]['students']} students,\n{rows[0]['queries']} queries)")
    ax.set_title(f"normal equations, float64, {out['device']} ({'1 thread' if out['device'] == 'cpu' else 'GPU'})",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
