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
For ReLU also the teacher neurons the queries can reveal at all (``ecdist.identifiable``: a
neuron dead or always on over every query is left out) and the overhead over those; the worst
1 − |cos| over those whose weights the queries determine (``identifiable(..., weights=True)``:
a kink that too few queries cross can tilt without changing any output; such neurons are listed
in ``undetermined_neurons``) (``*_identifiable``); for the other activations these equal the
plain figures.
A teacher whose recovery stops with ``RecoveryError`` (no cluster in a layer the next one needs)
is a row too: ``recovered`` null and the ``error``.

Part (c), deep teachers (``--deep digits:16-16 mnist1d:12-12-12``), reports the recovered width,
overhead and worst 1 − |cos| of every layer; their students get DEEP_LM_BUDGET and (Config's
default) geodesic acceleration. One LM iteration of a deep student costs seconds on one CPU core
(``normal_equations.py``): MNIST-1D 40-12-12-12-10 tanh took 26 min on 2 cores with the
acceleration, where plain LM had not finished its first layer in 2.5 h (``--runs`` and
``--backend ray`` let a run span sessions); minutes on a GPU.

Deep g teachers also get DEEP_G_LAYERS and fresh students UPPER_RHO × r wide above each inserted layer
(``Config.upper_widths``): see the comment there; rows record ``gamma`` and ``upper_widths``.

``--snapshot`` (with ``--runs``) makes each case's row from its run folder's students as checkpointed so
far (``ecdist.recover(..., train=False)``), training them no further, while the run may go on training; the row
has ``snapshot`` true, the run's ``lm_budget`` and, in ``students_steps``, how far its students had come. The
look is kept as a run of its own beside the run folder (``<run>-snapshot``, ``recover(..., snapshot=)``): a
deep teacher's later stages checkpoint there, and the same command again resumes them.
It uses the run's config with this script's clustering settings (``SNAPSHOT_FIELDS``), so a run folder
started before a setting changed is still looked at with the current one.

Students: N = 10, each ρ = 2 times as wide as the teacher (``--students``, ``--rho``; the authors' deep
runs used N = 50 and ρ = 3). Other values are recorded in the row and get a run folder of their own.

Part (d), plain vs augmented queries, uses a teacher with more parameters than images
(digits 64-32-10: 2,410 parameters on 1,438 training images). ``--train-images N`` runs part (d)
alone on a teacher trained on N of the training images (``train_on(..., n_train=N)``, the same
images for the same seed), r = the first of ``--widths``: plain = exactly those N images,
augmented = the same generators on those N images only; the held-out test set stays whole.
Sized for a CPU: digits 64-8-10 on 400 images (610 parameters, 570 once the 5 pixels constant
on those images are masked) → ``results/trained_teachers_subset.json`` and ``.png``.

The rows come from several machines and sessions (one teacher takes minutes on a GPU and up to
hours on one CPU core). ``--collect`` gathers the rows of the result files named in SOURCES into one
table over the cases the issue asks for — ``results/trained_teachers_table.json`` and ``.png`` —
with each case's verdict, the row it comes from, and the cases not measured yet. Where a case has
rows run with different LM budgets, the row with the script's current budget (``lm_budget``) counts,
the newest file first and, within a file, the later row; the others stay in the table as ``superseded``.

``--not-measured [TABLE]`` runs only the asked cases that the table (default: the last ``--collect``
output) has no row for, shallow and deep, each with the script's budget, into
``results/trained_teachers_not_measured.json`` (after the rows of earlier calls) — the last of SOURCES,
so the next ``--collect`` counts them; ``--list`` prints the cases a command would run and stops. On a GPU machine that is one command.

Run:  python benchmarks/trained_teachers.py [--quick] [--device cuda] [--out FILE] [--runs DIR]
      python benchmarks/trained_teachers.py --train-images 400 --widths 8 --threads 1
      python benchmarks/trained_teachers.py --not-measured --device cuda --runs runs [--list]
      python benchmarks/trained_teachers.py --collect
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common
import numpy as np

import ecdist
from ecdist import datasets, queries, storage, teachers
from ecdist.pipeline import SNAPSHOT_FIELDS
from ecdist.students import ACTIVE

ACTIVATIONS = ("g", "tanh", "sigmoid", "softplus", "relu")
RHO, N_STUDENTS = 2, 10
# g students on trained teachers keep improving slowly for ~1,000 LM iterations: under the default
# budget (300, stalled after 50 without a 10× gain) digits 64-8-10 gave 7 clusters, with this one 8, exact
LM_BUDGET = {"g": {"lm_max_iter": 1500, "stall_window": 300}}
# deep students too: on the 6-4-3-1 tanh teacher of tests/test_deep.py (8 students 12-9) the default
# budget left 5 of 8 students below 1e-14 relative MSE (one at 1e-6), this one 7 of 8 (6 at ~1e-16)
DEEP_LM_BUDGET = {"lm_max_iter": 1500, "stall_window": 300}
# deep g students creep down along near-flat directions, and at Config's student_tol (1e-16) they are
# not exact yet: on the 6-4-3-1 g toy (8 students 12-9, 600 queries) stopping there gave widths [5, 3]
# with layer-2 weights 0.08 off; running them on to 1e-28 gave [4, 3] with weights within 6.5e-14. At such
# a teacher the Gauss–Newton matrix JᵀJ/(n·Var y) has its smallest eigenvalue near 1e-7–1e-8 (tanh: 7e-6;
# condition ~1e9 against 2e6), so a relative MSE of 1e-16 pins the weights only to ~1e-4
DEEP_G_BUDGET = DEEP_LM_BUDGET | {"student_tol": 1e-28}
# On digits 64-16-16-10 g the students stall near 1e-4 relative MSE. Each has 12–14 of the 16 first-layer
# neurons (one teacher neuron in only 2 of 10 students, so γ = 0.5 misses it) and 3–9 of the second
# layer's, and fine-tuned on the recovered first layer they stay where they are, while fresh students
# 1.5× as wide find most of it. Hence deep g clusters of 2 students (γ = 0.2 of 10) and fresh students
# UPPER_RHO × r wide above each inserted layer; the exact fit of the whole network prunes the extras,
# once its LM fine-tune has run long enough: from the [20, 33] candidates 100 iterations ended at 5.8e-13.
DEEP_G_LAYERS = {"gamma": 0.2, "finetune_iter": 500}
UPPER_RHO = 3
DEFAULT_LM = {"lm_max_iter": ecdist.Config.lm_max_iter, "stall_window": ecdist.Config.stall_window}
# the result files --collect reads, oldest first (a newer file's row wins a case); the last is what
# --not-measured writes, read once it exists
SOURCES = ("trained_teachers_gpu.json", "trained_teachers_mnist1d_cpu.json", "trained_teachers_cpu.json",
           "trained_teachers_deep_cpu.json", "trained_teachers_not_measured.json")
SHALLOW_WIDTHS = (8, 16, 32)
DEEP_CASES = (("digits", [16, 16]), ("mnist1d", [12, 12, 12]))  # part (c)


def query_set(t: teachers.TrainedTeacher, kind: str, seed: int) -> np.ndarray:
    X = t.X_train
    if kind == "plain":
        return X
    grid = queries.grid_composition(X, len(X), seed=seed, shape=t.data.shape, grid=2)
    return np.vstack([X, queries.signed_noise(X, seed=seed), grid])


def script_budget(act: str, deep: bool) -> dict:
    """The LM fields this script sets for ``act``: DEEP_LM_BUDGET (DEEP_G_BUDGET for g) for deep
    teachers, else LM_BUDGET's."""
    if deep:
        return DEEP_G_BUDGET if act == "g" else DEEP_LM_BUDGET
    return LM_BUDGET.get(act, {})


def snapshot_folder(run: Path) -> Path:
    """Where ``--snapshot`` keeps its look at ``run`` (``recover(..., snapshot=)``), beside the run."""
    return run.with_name(f"{run.name}-snapshot")


def layer_settings(act: str, hidden: list[int]) -> dict:
    """Config's clustering fields this script sets for a deep teacher (DEEP_G_LAYERS and upper_widths for g)."""
    if act != "g" or len(hidden) < 2:
        return {}
    return DEEP_G_LAYERS | {"upper_widths": [UPPER_RHO * r for r in hidden[1:]]}


def lm_budget(act: str, args: argparse.Namespace, deep: bool = False) -> dict:
    """The LM fields of Config for ``act``: ``script_budget``, overridden by --lm-max-iter, --stall-window,
    --restart-above and --student-tol."""
    given = {k: v for k, v in (("lm_max_iter", args.lm_max_iter), ("stall_window", args.stall_window),
                               ("restart_above", args.restart_above), ("student_tol", args.student_tol))
             if v is not None}
    return script_budget(act, deep) | given


def log_steps(every: int = 50):
    """A progress callback for long runs in a log file: one line per ``every`` training steps
    (stage, step, best and median relative MSE, students converged or stalled)."""
    t0, printed = time.perf_counter(), set()

    def report(event: str, info: dict) -> None:
        if event == "train" and "step" in info and info["step"] % every == 0:
            key = (info.get("pack"), info.get("layer", 1), info["phase"], info["step"])
            if key in printed:  # on Ray the driver polls the actors: the same step arrives again
                return
            printed.add(key)
            losses, status = np.asarray(info["losses"]), np.asarray(info["status"])
            print(f"  [{time.perf_counter() - t0:7.0f} s] pack {info.get('pack')} layer {info.get('layer', 1)} {info['phase']} "
                  f"step {info['step']}: best {losses.min():.1e} median {np.median(losses):.1e} "
                  f"finished {int((status != ACTIVE).sum())}/{len(status)}", flush=True)
        elif event in ("resume", "cluster", "refit", "reconstruct"):
            print(f"  [{time.perf_counter() - t0:7.0f} s] {event} {info}", flush=True)
    return report


def run_one(dataset: str, hidden: int | list[int], act: str, kind: str, device: str, threads: int,
            train_images: int | None = None, lm: dict | None = None, runs: Path | None = None,
            execution: dict | None = None, rho: int = RHO, n_students: int = N_STUDENTS, snapshot: bool = False) -> dict:
    """One teacher [d_in, *hidden, 10] (trained on train_images images, None: all): train it,
    recover it with n_students students ρ times as wide, compare layer by layer. lm: Config fields of
    the LM budget (None: the defaults);
    runs: a folder for the run folders (one per teacher), so that a stopped run resumes where its
    packs' checkpoints left it when the same command runs again; execution: Config fields that
    only say where the students train (backend, pack_size), which a resumed run may change; snapshot:
    recover from the students as the run folder's checkpoints hold them now (``recover(train=False)``)."""
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    t0 = time.perf_counter()
    d_in = 64 if dataset == "digits" else 40
    t = teachers.train_on(dataset, [d_in, *hidden, 10], act, seed=0, n_train=train_images)
    mask = queries.input_mask(t.X_train)
    tm = teachers.masked(t, mask, fill=t.X_train[0])
    Q = query_set(t, kind, seed=1)[:, mask]
    widths = [rho * r for r in hidden]
    sizes = [int(mask.sum()), *widths, 10]
    P = sum((i + 1) * o for i, o in zip(sizes[:-1], sizes[1:]))
    teacher_sizes = [int(mask.sum()), *hidden, 10]
    cfg = ecdist.Config(activation=act, student_widths=widths, n_students=n_students, seed=0,
                        device=device, threads=threads, lm_max_params=max(2500, P),
                        **({"backend": "local"} | (execution or {}) | (lm or {}) | layer_settings(act, hidden)))
    arch = "-".join(map(str, hidden))
    other = f"-N{n_students}-rho{rho}" if (rho, n_students) != (RHO, N_STUDENTS) else ""  # students of their own
    out = runs / f"{dataset}-{act}-{arch}-{kind}{other}" if runs is not None else None
    resumed = out is not None and out.exists()
    if snapshot and not resumed:
        raise SystemExit(f"--snapshot: there is no run folder {out} to look at")
    if snapshot:  # the students as the run folder's checkpoints hold them; the run may train on meanwhile
        # as the run was configured (its LM budget), with this script's clustering settings
        stored = storage.RunFolder.existing(out, tidy=False).config()
        cfg = stored.replace(**{k: getattr(cfg, k) for k in SNAPSHOT_FIELDS}, threads=threads, backend="local")
        look = snapshot_folder(out)  # kept as a run of its own: the same command again resumes the look
        look_resumed = look.exists() and any(look.iterdir())
        res = ecdist.recover(None, Q, cfg, out=out, resume=True, train=False, snapshot=look, progress=log_steps())
    else:
        res = ecdist.recover(tm, Q, cfg, out=out, resume=resumed, progress=log_steps() if runs is not None else None)
    rep = ecdist.compare(res.network, tm, act, X=t.X_test[:, mask])
    dists = [np.asarray(d) for d in rep.weight_distance] or [np.array([np.nan])]
    # a ReLU neuron that is dead (or always on) on every query cannot be recovered by any method;
    # one whose kink too few queries cross counts in the width, but its angle is not determined
    ident = ecdist.identifiable(tm, act, Q)
    pinned = ecdist.identifiable(tm, act, Q, weights=True)
    seen = [int(m.sum()) for m in ident]
    dists_seen = [d[m] if len(d) == len(m) else d for d, m in zip(dists, pinned)]
    row = {
        "dataset": dataset, "activation": act, "r": hidden[0] if len(hidden) == 1 else hidden, "queries": kind,
        "n_queries": len(Q), "masked_inputs": int((~mask).sum()), "teacher_test_accuracy": t.test_accuracy,
        "n_train_images": len(t.X_train), "teacher_train_accuracy": t.train_accuracy,
        "teacher_params": sum(p.numel() for p in t.parameters()),
        "masked_teacher_params": sum((i + 1) * o for i, o in zip(teacher_sizes[:-1], teacher_sizes[1:])),
        "teacher_train_seconds": t.train_seconds,
        "student_width": widths[0] if len(widths) == 1 else widths, "params_per_student": P,
        "rho": rho, "n_students": n_students,
        "recovered": res.layer_sizes[0] if len(hidden) == 1 else res.layer_sizes,
        "overhead": (res.layer_sizes[0] - hidden[0]) / hidden[0] if len(hidden) == 1
        else [(k - r) / r for k, r in zip(res.layer_sizes, hidden)],
        "worst_1_minus_cos": float(max(d.max() for d in dists)),
        "median_1_minus_cos": float(np.median(np.concatenate(dists))),
        "worst_1_minus_cos_per_layer": [float(d.max()) for d in dists],
        "identifiable_r": seen[0] if len(hidden) == 1 else seen,
        "unidentifiable_neurons": [np.flatnonzero(~m).tolist() for m in ident],
        "undetermined_neurons": [np.flatnonzero(m & ~p).tolist() for m, p in zip(ident, pinned)],
        "overhead_identifiable": (res.layer_sizes[0] - seen[0]) / seen[0] if len(hidden) == 1
        else [(k - r) / r for k, r in zip(res.layer_sizes, seen)],
        "worst_1_minus_cos_identifiable": float(max((d.max() for d in dists_seen if d.size), default=0.0)),
        "functional_rel_mse_test": rep.functional_mse,
        "students_median_rel_mse": float(np.median(np.asarray(res.students.column("rel_loss")))),
        "students_rel_mse": np.asarray(res.students.column("rel_loss")).tolist(),
        "students_steps": np.asarray(res.students.column("steps")).tolist(),
        "students_status": res.students.column("status").to_pylist(),
        "lm_budget": {k: getattr(cfg, k) for k in ("lm_max_iter", "stall_window")}
        | {k: getattr(cfg, k) for k in ("restart_above", "student_tol") if getattr(cfg, k) != getattr(ecdist.Config, k)},
        "rule": res.layers[-1].rule, "seconds": time.perf_counter() - t0, "device": str(res.plan["device"]),
        "gamma": cfg.gamma, "upper_widths": cfg.upper_widths,
    }
    if out is not None:  # the time of this process only when it resumed a stopped run
        row |= {"run_folder": str(out), "resumed": resumed, "steps_resumed_from": res.plan["packs_resumed_from"]}
    if snapshot:  # lm_budget is the run's; students_steps says how far its students had come
        row |= {"snapshot": True, "snapshot_folder": str(look), "snapshot_resumed": look_resumed}
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
    ap.add_argument("--train-images", type=int, default=None, metavar="N",
                    help="part (d) only, on a digits tanh teacher (r = first of --widths) trained on N images")
    ap.add_argument("--collect", nargs="*", type=Path, default=None, metavar="FILE",
                    help="gather the rows of result files (default: SOURCES in results/) into one table")
    ap.add_argument("--runs", type=Path, default=None, metavar="DIR",
                    help="keep each teacher's run folder in DIR; the same command again resumes stopped runs")
    ap.add_argument("--backend", default="local", choices=["local", "ray"],
                    help="local: packs one after another in this process; ray: one actor per pack on a local Ray")
    ap.add_argument("--pack-size", type=int, default=0,
                    help="students per pack (a resumed run needs the split its checkpoints have)")
    ap.add_argument("--restart-above", type=float, default=None,
                    help="Config.restart_above: restart students that stall above this (recorded in lm_budget)")
    ap.add_argument("--lm-max-iter", type=int, default=None, help="Config.lm_max_iter (default: LM_BUDGET, else Config's)")
    ap.add_argument("--stall-window", type=int, default=None, help="Config.stall_window (default: LM_BUDGET, else Config's)")
    ap.add_argument("--student-tol", type=float, default=None,
                    help="Config.student_tol (default Config's, 1e-16; recorded in lm_budget when given)")
    ap.add_argument("--not-measured", nargs="?", type=Path, const=_common.RESULTS / "trained_teachers_table.json",
                    default=None, metavar="TABLE",
                    help="run only the asked cases that TABLE (default: results/trained_teachers_table.json) "
                         "marks not measured, shallow and deep, each with the script's budget")
    ap.add_argument("--students", type=int, default=N_STUDENTS, help="students per teacher (the authors' deep runs: 50)")
    ap.add_argument("--rho", type=int, default=RHO, help="student width / teacher width (the authors' deep runs: 3)")
    ap.add_argument("--snapshot", action="store_true",
                    help="with --runs: recover each case from its run folder's students as checkpointed so far, "
                         "training them no further (the run may go on training); the row says how far they had come; "
                         "the look is kept in <run>-snapshot beside it, and the same command again resumes it there")
    ap.add_argument("--list", action="store_true", help="print the cases that would run, as JSON, and stop")
    args = ap.parse_args()
    if args.collect is not None:
        return collect(args.collect or [_common.RESULTS / f for f in SOURCES if (_common.RESULTS / f).exists()],
                       args.out or _common.RESULTS / "trained_teachers_table.json")
    if args.train_images is not None:
        try:  # a bad N fails here, before any training
            datasets.load_dataset("digits").subset(args.train_images)
        except ecdist.EcdistError as e:
            ap.error(f"--train-images: {e}")
        return subset_pair(args)
    rows = []
    cases = [("digits", 8, "tanh")] if args.quick else [
        (ds, r, a) for ds in args.datasets for r in args.widths for a in args.activations]  # narrow first
    name = "trained_teachers_quick" if args.quick else "trained_teachers"
    path = args.out or _common.RESULTS / f"{name}.json"
    if args.deep:
        cases = [(d.split(":")[0], [int(w) for w in d.split(":")[1].split("-")], a)
                 for d in args.deep for a in args.activations]
        args.skip_plain = True
    earlier: dict[str, list] = {}
    if args.not_measured is not None:
        cases = not_measured(args.not_measured)
        args.skip_plain = True
        path = args.out or _common.RESULTS / "trained_teachers_not_measured.json"
        if path.exists():  # rows of earlier calls stay: --collect reads this file for them too
            earlier = {k: v for k, v in json.loads(path.read_text()).items() if k in ("shallow", "deep")}
        if not cases and not args.list:
            print(f"every asked case has a row in {args.not_measured}: nothing to run")
            return 0
    if args.list:
        print(json.dumps([{"dataset": ds, "r": r, "activation": a} for ds, r, a in cases]))
        return 0
    for ds, r, a in cases:
        t0, lm = time.perf_counter(), lm_budget(a, args, isinstance(r, list))
        try:
            rows.append(run_one(ds, r, a, "augmented", args.device, args.threads, lm=lm, runs=args.runs,
                                execution={"backend": args.backend, "pack_size": args.pack_size},
                                rho=args.rho, n_students=args.students, snapshot=args.snapshot))
        except ecdist.RecoveryError as e:  # a teacher that is not recovered is a result too
            rows.append({"dataset": ds, "activation": a, "r": r, "queries": "augmented", "recovered": None,
                         "error": str(e), "lm_budget": lm, "rho": args.rho, "n_students": args.students,
                         "seconds": time.perf_counter() - t0})
            print(f"{ds:8s} {a:8s} r={r}: not recovered: {e} [{rows[-1]['seconds']:.0f} s]", flush=True)
        _common.write_json(path.with_suffix(".partial.json"), {"shallow": rows})  # a killed run keeps its rows
    if args.skip_plain:
        parts = {"shallow": earlier.get("shallow", []) + [x for x in rows if not isinstance(x["r"], list)],
                 "deep": earlier.get("deep", []) + [x for x in rows if isinstance(x["r"], list)]}
        _common.write_json(path, {"benchmark": "trained_teachers", "machine": _common.machine_info(),
                                  **{k: v for k, v in parts.items() if v or (k == "deep") == bool(args.deep)}})
        return 0
    plain = [run_one("digits", 32 if not args.quick else 8, "tanh", "plain", args.device, args.threads)]
    aug = [x for x in rows if x["dataset"] == "digits" and x["activation"] == "tanh" and x["r"] == plain[0]["r"]]
    if not aug:
        aug = [run_one("digits", plain[0]["r"], "tanh", "augmented", args.device, args.threads)]
    shallow, done = list(rows), [x for x in rows if x["recovered"] is not None]
    out = {
        "benchmark": "trained_teachers",
        "machine": _common.machine_info(),
        "settings": {"rho": RHO, "n_students": N_STUDENTS, "device": args.device},
        "shallow": shallow,
        "plain_vs_augmented": {"plain": plain[0], "augmented": aug[0]},
        "summary": {
            "teachers": len(shallow),
            "not_recovered": len(shallow) - len(done),
            "exact_width": sum(x["recovered"] == x["r"] for x in done),
            "overhead_at_most_5pct": sum(x["overhead"] <= 0.05 for x in done),
            "all_neurons_within_1e-3": sum(x["worst_1_minus_cos"] < 1e-3 for x in done),
        },
    }
    _common.write_json(path, out)
    plot(out, path.with_suffix(".png"))
    print(out["summary"])
    return 0


def not_measured(table: Path) -> list[tuple]:
    """The asked cases that ``table`` (a ``--collect`` output) marks not measured, as (dataset, r, activation):
    r an int for a shallow teacher, a list of widths for a deep one."""
    try:
        cases = json.loads(table.read_text())["cases"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--not-measured: {table} is not a table written by --collect: {e}") from None
    return [(c["dataset"], c["r"][0] if len(c["r"]) == 1 else list(c["r"]), c["activation"])
            for c in cases if c["asked"] and c["verdict"] == "not_measured"]


def subset_pair(args: argparse.Namespace) -> int:
    """Part (d) on a teacher trained on ``args.train_images`` images: plain, then augmented queries."""
    r = args.widths[0]
    path = args.out or _common.RESULTS / "trained_teachers_subset.json"
    lm = lm_budget("tanh", args)
    pair = {}
    for kind in ("plain", "augmented"):
        pair[kind] = run_one("digits", r, "tanh", kind, args.device, args.threads, args.train_images, lm)
        _common.write_json(path.with_suffix(".partial.json"), {"plain_vs_augmented": pair})
    p = pair["plain"]
    out = {
        "benchmark": "trained_teachers",
        "machine": _common.machine_info(),
        "settings": {"rho": RHO, "n_students": N_STUDENTS, "device": args.device, "train_images": args.train_images,
                     **lm},
        "plain_vs_augmented": pair,
        "summary": {
            "teacher_params": p["teacher_params"], "masked_teacher_params": p["masked_teacher_params"],
            "train_images": p["n_train_images"], "more_params_than_images": p["teacher_params"] > p["n_train_images"],
            "recovered": {k: x["recovered"] for k, x in pair.items()},
        },
    }
    _common.write_json(path, out)
    path.with_suffix(".partial.json").unlink(missing_ok=True)
    plot_pair(out, path.with_suffix(".png"))
    print(out["summary"])
    return 0


def verdict(row: dict) -> str:
    """What a row shows against the issue's bar: "exact" (every layer's width equals the teacher's
    and every teacher neuron has 1 − |cos| < 1e-3), "exact_identifiable" (the same for the neurons the
    queries can reveal: a ReLU neuron dead on every query cannot be recovered, and one whose kink
    too few queries cross has no determined angle), "within_bound"
    (shallow: overhead ≤ 5%; deep: every width within +1; neurons < 1e-3), "wrong" or "not_recovered"."""
    if row.get("recovered") is None:
        return "not_recovered"
    r, got = np.atleast_1d(row["r"]), np.atleast_1d(row["recovered"])
    seen = np.atleast_1d(row.get("identifiable_r", row["r"]))
    worst = row["worst_1_minus_cos"]
    worst_seen = row.get("worst_1_minus_cos_identifiable", worst)
    if np.array_equal(got, r) and worst < 1e-3:
        return "exact"
    if np.array_equal(got, seen) and worst_seen < 1e-3:
        return "exact_identifiable"
    over = got - seen
    bound = (over >= 0) & ((over <= 1) if len(r) > 1 else (over / seen <= 0.05))
    return "within_bound" if bool(np.all(bound)) and worst_seen < 1e-3 else "wrong"


def collect(sources: list[Path], path: Path) -> int:
    """One table over the issue's cases from the rows of ``sources`` (oldest first): see the module
    docstring. Writes ``path`` and its ``.png``."""
    rows = []
    for order, src in enumerate(sources):
        data = json.loads(src.read_text())
        for row in data.get("shallow", []) + data.get("deep", []):
            budget = row.get("lm_budget") or DEFAULT_LM  # rows from before LM budgets were recorded: the defaults
            device = row.get("device") or ("cuda" if "gpu" in src.name else "cpu")  # older rows: the file says
            rows.append(row | {
                "source": src.name, "order": order, "position": len(rows),
                "device": "cuda" if device.startswith("cuda") else "cpu",
                "lm_budget": budget,
                "current_budget": budget == DEFAULT_LM | script_budget(row["activation"], isinstance(row["r"], list)),
                "rho": row.get("rho", RHO), "n_students": row.get("n_students", N_STUDENTS),  # older rows: the defaults
                "verdict": verdict(row),
            })
    asked = [(ds, [r], a) for ds in ("digits", "mnist1d") for a in ACTIVATIONS for r in SHALLOW_WIDTHS]
    asked += [(ds, list(r), a) for ds, r in DEEP_CASES for a in ("g", "tanh")]
    extra = sorted({(x["dataset"], tuple(np.atleast_1d(x["r"]).tolist()), x["activation"]) for x in rows}
                   - {(ds, tuple(r), a) for ds, r, a in asked})
    cases = []
    for ds, r, a in asked + [(ds, list(r), a) for ds, r, a in extra]:
        mine = [x for x in rows if x["dataset"] == ds and x["activation"] == a
                and np.atleast_1d(x["r"]).tolist() == r]
        mine.sort(key=lambda x: (x["current_budget"], x["order"], x["position"]), reverse=True)
        case = {"dataset": ds, "activation": a, "r": r, "asked": (ds, r, a) in asked,
                "verdict": mine[0]["verdict"] if mine else "not_measured"}
        if mine:
            best = mine[0]
            case |= {k: best.get(k) for k in (
                "recovered", "identifiable_r", "worst_1_minus_cos", "worst_1_minus_cos_identifiable",
                "functional_rel_mse_test", "students_median_rel_mse", "seconds", "device", "lm_budget",
                "current_budget", "rho", "n_students", "source", "command")}
            case["superseded"] = [{k: x.get(k) for k in ("source", "device", "recovered", "lm_budget", "rho", "n_students",
                                                        "verdict")}
                                  for x in mine[1:]]
        cases.append(case)
    counts: dict[str, dict[str, int]] = {}
    for c in cases:
        if c["asked"]:
            part = "deep" if len(c["r"]) > 1 else "shallow"
            counts.setdefault(part, {}).setdefault(c["verdict"], 0)
            counts[part][c["verdict"]] += 1
    out = {"benchmark": "trained_teachers_table", "machine": _common.machine_info(),
           "sources": [s.name for s in sources], "summary": counts, "cases": cases}
    _common.write_json(path, out)
    plot_table(out, path.with_suffix(".png"))
    for part, n in counts.items():
        print(f"{part}: " + ", ".join(f"{v} {k}" for k, v in sorted(n.items())))
    return 0


VERDICT_COLOURS = {"exact": "#4caf50", "exact_identifiable": "#8bc34a", "within_bound": "#cddc39",
                   "wrong": "#f44336", "not_recovered": "#b71c1c", "not_measured": "#e0e0e0"}


def plot_table(out: dict, path: Path) -> None:
    """The cases as coloured cells: activation × width per data set, then the deep teachers; each
    cell says the recovered width(s), the worst 1 − |cos| and where it ran."""
    plt = _common.pyplot()
    from matplotlib.patches import Patch

    cases = out["cases"]
    shallow = [c for c in cases if len(c["r"]) == 1]
    deep = [c for c in cases if len(c["r"]) > 1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [3, 3, 2.6]})

    def cell(ax, x, y, c):
        ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, color=VERDICT_COLOURS[c["verdict"]], ec="white"))
        if c["verdict"] == "not_measured":
            ax.text(x, y, "—", ha="center", va="center", fontsize=8)
            return
        got = "not rec." if c["recovered"] is None else "-".join(map(str, np.atleast_1d(c["recovered"])))
        seen = c["r"] if c.get("identifiable_r") is None else c["identifiable_r"]
        if c["recovered"] is not None and np.atleast_1d(seen).tolist() != c["r"]:  # ReLU: dead neurons left out
            got += f" ({'-'.join(map(str, np.atleast_1d(seen)))} seen)"
        w = c.get("worst_1_minus_cos_identifiable")
        w = c["worst_1_minus_cos"] if w is None else w  # a worst of exactly 0 is a value, not a missing one
        worst = "" if c["recovered"] is None else f"\n{w:.0e}"
        ax.text(x, y, f"{got}{worst}\n{c['device']}", ha="center", va="center", fontsize=7)

    for ax, ds in zip(axes[:2], ("digits", "mnist1d")):
        mine = [c for c in shallow if c["dataset"] == ds]
        widths = sorted({c["r"][0] for c in mine})
        acts = [a for a in ACTIVATIONS if any(c["activation"] == a for c in mine)]
        for c in mine:
            cell(ax, widths.index(c["r"][0]), acts.index(c["activation"]), c)
        ax.set_xticks(range(len(widths)), [f"r = {w}" for w in widths])
        ax.set_yticks(range(len(acts)), acts)
        ax.set_xlim(-0.5, len(widths) - 0.5)
        ax.set_ylim(len(acts) - 0.5, -0.5)
        ax.set_title(f"{ds} {'64' if ds == 'digits' else '40'}-r-10: recovered, worst 1−|cos| (seen neurons)",
                     fontsize=9)
    ax = axes[2]
    for i, c in enumerate(deep):
        cell(ax, 0, i, c)
    ax.set_xticks([])
    ax.set_yticks(range(len(deep)), [f"{c['dataset']} {'-'.join(map(str, c['r']))} {c['activation']}"
                                     + ("" if c["asked"] else " *") for c in deep], fontsize=8)
    ax.set_xlim(-0.5, 0.5)
    ax.set_ylim(len(deep) - 0.5, -0.5)
    ax.set_title("deep teachers (* smaller than asked)", fontsize=9)
    fig.legend(handles=[Patch(color=v, label=k.replace("_", " ")) for k, v in VERDICT_COLOURS.items()],
               loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pair(out: dict, path: Path) -> None:
    """Plain vs augmented side by side: recovered width, worst 1 − |cos|, test relative MSE and
    every student's relative MSE (points, so that a value of 1 = 10⁰ stays visible)."""
    plt = _common.pyplot()

    pair = out["plain_vs_augmented"]
    kinds = list(pair)
    labels = [f"{k}\n{pair[k]['n_queries']} queries" for k in kinds]
    p = pair[kinds[0]]
    panels = [
        ("log10 worst 1 − |cos|", "worst_1_minus_cos", -3),
        ("log10 functional rel. MSE (test)", "functional_rel_mse_test", None),
        ("log10 students' rel. MSE (queries)", "students_rel_mse", None),
    ]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(13, 3.6))
    axes[0].bar(range(len(kinds)), [pair[k]["recovered"] for k in kinds], color=["C3", "C0"])
    axes[0].axhline(p["r"], color="k", ls=":", lw=1)
    axes[0].set_title(f"recovered width (teacher {p['r']})", fontsize=9)
    for ax, (title, key, ref) in zip(axes[1:], panels):
        for i, k in enumerate(kinds):
            v = np.atleast_1d(pair[k].get(key, pair[k].get("students_median_rel_mse")))
            y = np.log10(np.maximum(v, 1e-32))
            ax.plot(np.full(len(y), i), y, "o", color=["C3", "C0"][i], alpha=0.7)
            ax.annotate(f"{np.median(v):.1e}", (i, float(np.median(y))), xytext=(8, 0),
                        textcoords="offset points", fontsize=8, va="center")
        if ref is not None:
            ax.axhline(ref, color="k", ls=":", lw=1)
        ax.set_xlim(-0.5, len(kinds) - 0.5)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks(range(len(kinds)), labels, fontsize=8)
    fig.suptitle(f"digits 64-{p['r']}-10 {p['activation']} trained on {p['n_train_images']} images "
                 f"({p['teacher_params']} parameters; {p['masked_teacher_params']} on the varying pixels)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(out: dict, path: Path) -> None:
    plt = _common.pyplot()

    rows = [x for x in out["shallow"] if x["recovered"] is not None]
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
