"""Student throughput: stacked packs vs a per-student loop, and 1 vs 2 Ray actors.

(a) one ``StudentPack`` of N stacked students trained together (one batched forward and one
    Adam step for all N) against (b) N separate ``torch.nn.Sequential`` models, each with its
    own Adam, trained one after another on the same minibatches — how most code trains an
    ensemble. Both: float64, the reference's Adam (lr 1e-3, batch 512), a fixed number of
    epochs on n queries of a 10-4-1 tanh teacher, one torch thread (the cores are measured
    separately in (c)). Figure: students·epochs per second; ratio (a)/(b) from the same run.
    Also the time for Levenberg–Marquardt — ecdist's default optimiser — to train one stacked
    pack to machine precision ("time to a trained pack").
(c) ``ecdist.distributed.PackGroup`` on a local Ray: the same N students, LM for a fixed
    number of iterations (no early stops, so both runs do the same work), as one actor with
    one CPU vs two actors with one CPU each. Figure: training throughput once the actors are
    up; the ratio with the actors' start (a process that imports torch) is recorded beside it.
The measuring functions are ``ecdist.bench.students`` and ``ecdist.bench.actors`` (what
``ecdist bench`` runs); this script keeps its own sizes and JSON layout.

Both (a) and (b) run with ecdist's heap setting (``students.keep_heap``, set by every ecdist
optimiser): without it glibc unmaps the 13 MB activations of a stacked step on free and faults
them in again, which cost the stacked pack half its time here. The minor page faults of each
case are in the JSON. Each case alternates the two sides three times and keeps each side's
fastest run (all runs are in the JSON): the machine's speed drifts by ±20% from minute to minute.

Run:  python benchmarks/scaling_students.py [--quick]
Out:  benchmarks/results/scaling_students.json and .png
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import _common
import numpy as np
import torch

from ecdist import distributed
from ecdist.bench.actors import ActorSizes, compare
from ecdist.bench.students import TEACHER, compare_adam, problem
from ecdist.students import LMOptions, StudentPack, fit_lm, keep_heap


def lm_to_precision(N: int, width: int, X: torch.Tensor, Y: torch.Tensor) -> dict:
    pack = StudentPack.init([TEACHER[0], width, 1], "tanh", list(range(N)), seed=0)
    t0 = time.perf_counter()
    fit_lm(pack, X, Y, LMOptions(max_iter=300, tol=1e-20, restarts=0))
    return {"seconds": time.perf_counter() - t0, "iterations": pack.steps,
            "median_rel_mse": float(np.median(pack.rel_loss))}


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test, ~1 min)")
    args = ap.parse_args()
    quick = args.quick
    torch.set_num_threads(1)
    keep_heap()  # process-wide: the loop (b) gets it too
    n = 2000
    X, Y = problem(TEACHER, n)
    epochs = 2 if quick else 5
    cases = [(20, 16), (200, 16)] if quick else [(1, 16), (5, 16), (20, 16), (50, 16), (100, 16), (200, 16), (20, 64)]
    stack_rows = []
    for N, w in cases:
        f0 = faults()
        row = compare_adam([TEACHER[0], w, TEACHER[-1]], N, X, Y, epochs, repeats=1 if quick else 3)
        row["speedup"] = row.pop("ratio")
        row["minor_faults"] = faults() - f0
        stack_rows.append(row)
        print(f"N={N:4d} width={w:3d}: stacked {row['stacked_students_epochs_per_s']:9.1f} st·ep/s, "
              f"loop {row['loop_students_epochs_per_s']:8.1f} st·ep/s, ×{row['speedup']:.1f}", flush=True)
    lm = lm_to_precision(20, 16, X, Y)
    print(f"LM, one pack of 20 width-16 students to 1e-20: {lm['seconds']:.1f} s, {lm['iterations']} iterations")

    # 32 students, not fewer: a pack of 16 then costs half a pack of 32 (a pack of 4 cost 65% of a pack of 8)
    sizes = ActorSizes(students=8 if quick else 32, width=16, queries=4000, iterations=10 if quick else 100,
                       repeats=1 if quick else 3)
    Xr, Yr = (t.numpy() for t in problem(TEACHER, sizes.queries))
    with distributed.session(num_cpus=2):
        ray_cmp = compare(sizes, Xr, Yr)
    one, two = ray_cmp["one"]["train_s"], ray_cmp["two"]["train_s"]
    ray_row = {"N": sizes.students, "width": sizes.width, "queries": sizes.queries, "lm_iterations": sizes.iterations,
               "one_actor_s": one, "two_actors_s": two,
               "one_actor_students_per_s": sizes.students / one, "two_actors_students_per_s": sizes.students / two,
               "speedup": one / two, "speedup_end_to_end": ray_cmp["ratio_end_to_end"],
               "one_actor_start_s": ray_cmp["one"]["start_s"], "two_actors_start_s": ray_cmp["two"]["start_s"],
               "runs": {k: ray_cmp[k] for k in ("one_runs_s", "two_runs_s", "one_runs_end_to_end_s",
                                                "two_runs_end_to_end_s")}}
    print(f"Ray, {sizes.students} students × {sizes.iterations} LM iterations: training 1 actor {one:.1f} s, "
          f"2 actors {two:.1f} s, ×{one / two:.2f}; with the actors' start ×{ray_cmp['ratio_end_to_end']:.2f}")

    out = {
        "benchmark": "scaling_students",
        "machine": _common.machine_info(),
        "quick": quick,
        "teacher": TEACHER,
        "stacked_vs_loop": stack_rows,
        "lm_time_to_trained_pack": {"N": 20, "width": 16, "queries": n} | lm,
        "ray_actors": ray_row,
        "gpu": None,  # no GPU was lent to the session that produced this file
    }
    name = "scaling_students_quick" if quick else "scaling_students"
    _common.write_json(_common.RESULTS / f"{name}.json", out)
    plot(out, _common.RESULTS / f"{name}.png")
    print(f"wrote {_common.RESULTS / name}.json/.png")
    return 0


def plot(out: dict, path) -> None:
    plt = _common.pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in out["stacked_vs_loop"] if r["width"] == 16]
    Ns = [r["N"] for r in rows]
    ax1.loglog(Ns, [r["stacked_students_epochs_per_s"] for r in rows], "o-", label="one stacked pack")
    ax1.loglog(Ns, [r["loop_students_epochs_per_s"] for r in rows], "s-", label="per-student loop")
    for r in rows:
        ax1.annotate(f"×{r['speedup']:.0f}", (r["N"], r["stacked_students_epochs_per_s"]), fontsize=8,
                     textcoords="offset points", xytext=(0, 5))
    ax1.set_xlabel("students N (width 16, 10-4-1 teacher)")
    ax1.set_ylabel("students·epochs / s (Adam, 1 thread)")
    ax1.legend()
    ray_row = out["ray_actors"]
    ax2.bar(["1 actor", "2 actors"], [ray_row["one_actor_students_per_s"], ray_row["two_actors_students_per_s"]])
    ax2.set_ylabel(f"students / s ({ray_row['lm_iterations']} LM iterations)")
    ax2.set_title(f"Ray on {out['machine']['cpu_affinity']} cores: ×{ray_row['speedup']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
