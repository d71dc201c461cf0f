"""Student throughput: stacked packs vs a per-student loop, and 1 vs 2 Ray actors.

(a) one ``StudentPack`` of N stacked students trained together (one batched forward and one
    Adam step for all N) against (b) N separate ``torch.nn.Sequential`` models, each with its
    own Adam, trained one after another on the same minibatches — how most code trains an
    ensemble. Both: float64, the reference's Adam (lr 1e-3, batch 512), a fixed number of
    epochs on n queries of a 10-4-1 tanh teacher, one torch thread (the cores are measured
    separately in (c)). Figure: students·epochs per second; ratio (a)/(b) from the same run.
    Also the time for Levenberg–Marquardt — ecdist's default optimiser — to train one stacked
    pack to machine precision ("time to a trained pack").
(c) ``ecdist.distributed.train_packs`` on a local Ray: the same N students, LM for a fixed
    number of iterations (no early stops, so both runs do the same work), as one actor with
    one CPU vs two actors with one CPU each. Ray's start is excluded; actor start-up is not.

Both (a) and (b) run with ecdist's heap setting (``students.keep_heap``, set by every ecdist
optimiser): without it glibc unmaps the 13 MB activations of a stacked step on free and faults
them in again, which cost the stacked pack half its time here. The minor page faults of each
side are in the JSON.

Run:  python benchmarks/scaling_students.py [--quick]
Out:  benchmarks/results/scaling_students.json and .png
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time

import _common
import numpy as np
import torch

import ecdist
from ecdist.queries import Standardizer
from ecdist.students import AdamOptions, LMOptions, StudentPack, fit_adam, fit_lm, keep_heap

TEACHER = [10, 4, 1]


def problem(n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    t = ecdist.teachers.random_mlp(TEACHER, "tanh", seed=0)
    X = ecdist.queries.gaussian(n, TEACHER[0], seed=1)
    Y = ecdist.teachers.query(t, X)
    Xs, Ys = Standardizer.fit(X)(X), Standardizer.fit(Y)(Y)
    return torch.as_tensor(Xs), torch.as_tensor(Ys), Xs, Ys


def stacked_adam(N: int, width: int, X: torch.Tensor, Y: torch.Tensor, epochs: int) -> float:
    pack = StudentPack.init([TEACHER[0], width, 1], "tanh", list(range(N)), seed=0)
    fit_adam(pack, X, Y, AdamOptions(max_epochs=1, log_every=10**9), seed=0)  # warm-up (first-call costs)
    t0 = time.perf_counter()
    fit_adam(pack, X, Y, AdamOptions(max_epochs=epochs, log_every=10**9), seed=0)
    return time.perf_counter() - t0


def loop_adam(N: int, width: int, X: torch.Tensor, Y: torch.Tensor, epochs: int) -> float:
    """N independent models, each with its own Adam, on the same minibatch order."""
    models = []
    for i in range(N):
        torch.manual_seed(i)
        m = torch.nn.Sequential(torch.nn.Linear(TEACHER[0], width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).double()
        models.append((m, torch.optim.Adam(m.parameters(), lr=1e-3)))
    gen = torch.Generator().manual_seed(0)
    n = X.shape[0]
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for m, opt in models:
            for s in range(0, n, 512):
                b = perm[s : s + 512]
                loss = ((m(X[b]) - Y[b]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return time.perf_counter() - t0


def lm_to_precision(N: int, width: int, X: torch.Tensor, Y: torch.Tensor) -> dict:
    pack = StudentPack.init([TEACHER[0], width, 1], "tanh", list(range(N)), seed=0)
    t0 = time.perf_counter()
    fit_lm(pack, X, Y, LMOptions(max_iter=300, tol=1e-20, restarts=0))
    return {"seconds": time.perf_counter() - t0, "iterations": pack.steps,
            "median_rel_mse": float(np.median(pack.rel_loss))}


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def actors(N: int, width: int, Xs: np.ndarray, Ys: np.ndarray, iters: int, n_actors: int) -> float:
    from ecdist import distributed
    from ecdist.pipeline import _plan

    cfg = ecdist.Config(activation="tanh", student_widths=[width], n_students=N, seed=0, student_tol=0.0, gamma=1.0,
                        stall_window=10**6, restarts=0, lm_max_iter=iters, pack_size=math.ceil(N / n_actors))
    plan = _plan(cfg, Xs.shape[1], Ys.shape[1], ray_resources=distributed.resources())
    assert len(plan["packs"]) == n_actors
    t0 = time.perf_counter()
    results = list(distributed.train_packs(cfg, plan, Xs, Ys, None, lambda e, i: None))
    assert len(results) == n_actors
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test, ~1 min)")
    args = ap.parse_args()
    quick = args.quick
    torch.set_num_threads(1)
    keep_heap()  # process-wide: the loop (b) gets it too
    n = 2000
    X, Y, Xs, Ys = problem(n)
    epochs = 2 if quick else 5
    cases = [(20, 16), (200, 16)] if quick else [(1, 16), (5, 16), (20, 16), (50, 16), (100, 16), (200, 16), (20, 64)]
    stack_rows = []
    for N, w in cases:
        f0 = faults()
        ts = stacked_adam(N, w, X, Y, epochs)
        f1 = faults()
        tl = loop_adam(N, w, X, Y, epochs)
        f2 = faults()
        row = {"N": N, "width": w, "epochs": epochs, "queries": n,
               "stacked_s": ts, "loop_s": tl,
               "stacked_students_epochs_per_s": N * epochs / ts, "loop_students_epochs_per_s": N * epochs / tl,
               "speedup": tl / ts, "stacked_minor_faults": f1 - f0, "loop_minor_faults": f2 - f1}
        stack_rows.append(row)
        print(f"N={N:4d} width={w:3d}: stacked {row['stacked_students_epochs_per_s']:9.1f} st·ep/s, "
              f"loop {row['loop_students_epochs_per_s']:8.1f} st·ep/s, ×{row['speedup']:.1f}", flush=True)
    lm = lm_to_precision(20, 16, X, Y)
    print(f"LM, one pack of 20 width-16 students to 1e-20: {lm['seconds']:.1f} s, {lm['iterations']} iterations")

    import ray

    N_ray, w_ray, iters = (8, 16, 10) if quick else (8, 16, 200)  # ~30 s of work: actor start-up (~3 s) is small
    Xr, Yr = problem(4000)[2:]
    ray.init(num_cpus=2, include_dashboard=False, namespace="ecdist", log_to_driver=False)
    try:
        actors(4, w_ray, Xr, Yr, 2, 2)  # warm-up: worker processes, imports
        one = actors(N_ray, w_ray, Xr, Yr, iters, 1)
        two = actors(N_ray, w_ray, Xr, Yr, iters, 2)
    finally:
        ray.shutdown()
    ray_row = {"N": N_ray, "width": w_ray, "queries": 4000, "lm_iterations": iters,
               "one_actor_s": one, "two_actors_s": two,
               "one_actor_students_per_s": N_ray / one, "two_actors_students_per_s": N_ray / two,
               "speedup": one / two}
    print(f"Ray, {N_ray} students × {iters} LM iterations: 1 actor {one:.1f} s, 2 actors {two:.1f} s, ×{one / two:.2f}")

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
