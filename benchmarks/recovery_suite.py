"""Recovery suite: how often does Expand-and-Cluster recover a synthetic teacher exactly, per ρ?

A fixed list of one-hidden-layer teachers (``TEACHERS``: activation, d_in, width, seed), each
recovered with students ρ = 1, 2, 4 times wider than the teacher, on the same queries.

Success (the issue's bar): the recovered width equals the teacher's AND every teacher neuron has
a recovered neuron within 1 − |cos| < 1e-4 (``ecdist.compare(...).max_weight_distance``; the
functional error is measured on 2,000 fresh Gaussian inputs). The paper's figure to beat: ρ = 4
recovers 80% of its 150 toy problems (arXiv v2 abstract).

Protocol, per teacher (every seed is written down, so the suite is deterministic on one machine):
  * teacher  ``ecdist.teachers.random_mlp([d_in, width, 1], activation, seed)``;
  * queries  ``ecdist.queries.gaussian(n, d_in, seed + 1000)`` with
             n = max(1000, 5 · P₄), P₄ = 4·width·(d_in + 2) + 1 the parameters of one ρ = 4
             student: every student sees at least 5 queries per parameter (an exact fit is then
             not an interpolation), and the same X serves every ρ, so ρ is the only change;
  * students ``ecdist.Config(activation, student_widths=[ρ·width], n_students=10, seed=seed)``,
             everything else at its default (stable rule, γ = 0.5, β = π/3, pruning on);
             ``threads`` = 1 (``--threads``) so that results do not depend on the core count;
  * test     ``ecdist.queries.gaussian(2000, d_in, seed + 2000)``.
At ρ = 4 the same trained students are clustered again with ``ecdist.recluster`` (no
retraining) under the authors' rule (``cluster_rule="reference"``, β = π/6 and π/3, no pruning)
and under the stable rule without pruning, to show which rule recovers more teachers; the
authors' rule is also run with ecdist's pruning, the counterpart of the default run.

Run:   python benchmarks/recovery_suite.py             (full suite: 16–25 min on 2 shared cores)
       python benchmarks/recovery_suite.py --quick     (6 cheap teachers, ρ = 4 only, < 1 min)
       python benchmarks/recovery_suite.py --resume    (skip the runs already in the JSON)
Out:   benchmarks/results/recovery_suite.json (+ .png); --quick writes recovery_suite_quick.*
The JSON is rewritten after every run, so a killed suite keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch

import ecdist
from ecdist import activations
from ecdist.queries import Standardizer

SUCCESS_DW = 1e-4  # worst 1 − |cos| over teacher neurons, the bar
RHOS = (1, 2, 4)
N_STUDENTS = 10
QUERIES_PER_PARAM = 5  # n = max(MIN_QUERIES, 5 · P of a ρ = 4 student)
MIN_QUERIES = 1000
N_TEST = 2000
PAPER_RHO4 = 0.80  # arXiv v2: ρ = 4 recovers 80% of 150 toy problems

# The fixed suite: 3 teachers per activation, 4 for tanh and sigmoid (identity is skipped: it has
# no width to recover), d_in 4–32 and widths 2–16. The size of a ρ = 4 student (P₄ in the comment) sets the cost
# (∝ n·P₄² per LM iteration, n ∝ P₄): the list keeps P₄ mostly below ~450, with a few
# larger ones (d_in 32, width 16 would be P₄ ≈ 2200 and ~30× the cost of the largest here).
TEACHERS: list[dict[str, Any]] = [
    # activation    d_in  width  seed     P₄
    dict(activation="g", d_in=4, width=4, seed=101),  # 97
    dict(activation="g", d_in=12, width=6, seed=102),  # 337
    dict(activation="g", d_in=32, width=2, seed=103),  # 273
    dict(activation="tanh", d_in=4, width=8, seed=201),  # 193
    dict(activation="tanh", d_in=8, width=4, seed=202),  # 161
    dict(activation="tanh", d_in=32, width=3, seed=203),  # 409
    dict(activation="tanh", d_in=8, width=16, seed=204),  # 641
    dict(activation="sigmoid", d_in=6, width=3, seed=301),  # 97
    dict(activation="sigmoid", d_in=8, width=8, seed=302),  # 321
    dict(activation="sigmoid", d_in=24, width=4, seed=303),  # 417
    dict(activation="sigmoid", d_in=32, width=4, seed=304),  # 545
    dict(activation="softplus", d_in=4, width=2, seed=401),  # 49
    dict(activation="softplus", d_in=16, width=4, seed=402),  # 289
    dict(activation="softplus", d_in=4, width=16, seed=403),  # 385
    dict(activation="gelu", d_in=12, width=3, seed=501),  # 169
    dict(activation="gelu", d_in=6, width=6, seed=502),  # 193
    dict(activation="gelu", d_in=16, width=8, seed=503),  # 577
    dict(activation="silu", d_in=8, width=4, seed=601),  # 161
    dict(activation="silu", d_in=16, width=2, seed=602),  # 145
    dict(activation="silu", d_in=24, width=4, seed=603),  # 417
    dict(activation="relu", d_in=4, width=4, seed=701),  # 97
    dict(activation="relu", d_in=12, width=6, seed=702),  # 337
    dict(activation="relu", d_in=32, width=2, seed=703),  # 273
]
QUICK = ["tanh-8-4-s202", "sigmoid-6-3-s301", "softplus-4-2-s401", "gelu-12-3-s501", "silu-16-2-s602", "relu-4-4-s701"]

# Re-clusterings of the ρ = 4 students: name → recluster() changes. "default" is the run itself.
# The authors' code has no negligible-neuron drop, so the faithful reference runs set drop=0;
# "reference_pi6_drop" is ecdist's reference mode with its default drop (1e-3) left on, and
# "reference_pi6_prune" the authors' clustering followed by ecdist's exact-fit pruning — the
# counterpart of the default run (stable + prune).
RULES: dict[str, dict[str, Any]] = {
    "stable": dict(cluster_rule="stable", prune=False),
    "reference_pi6": dict(cluster_rule="reference", beta=math.pi / 6, drop=0.0, prune=False),
    "reference_pi3": dict(cluster_rule="reference", beta=math.pi / 3, drop=0.0, prune=False),
    "reference_pi6_drop": dict(cluster_rule="reference", beta=math.pi / 6, prune=False),
    "reference_pi6_prune": dict(cluster_rule="reference", beta=math.pi / 6, drop=0.0, prune=True),
}


def teacher_id(t: dict[str, Any]) -> str:
    return f"{t['activation']}-{t['d_in']}-{t['width']}-s{t['seed']}"


def n_params(d_in: int, width: int) -> int:
    return width * (d_in + 2) + 1


def n_queries(t: dict[str, Any]) -> int:
    return max(MIN_QUERIES, QUERIES_PER_PARAM * n_params(t["d_in"], 4 * t["width"]))


def teacher_profile(teacher, activation: str, X: np.ndarray) -> dict[str, Any]:
    """How identifiable the teacher's neurons are on these queries (to read failures by)."""
    V = teacher.neuron_vectors(0)  # (width, d_in + 1)
    a = teacher.outgoing(0)[:, 0]  # (width,)
    Z = X @ V[:, :-1].T + V[:, -1]
    H = activations.get(activation).fn(torch.as_tensor(Z)).numpy()
    contrib = H.std(axis=0) * np.abs(a)
    cos = np.abs(_cos(V))
    np.fill_diagonal(cos, 0.0)
    return {
        "min_rel_contribution": float(contrib.min() / contrib.max()),  # weakest neuron's share of the output
        "min_active_fraction": float((Z > 0).mean(axis=0).min()),  # min over neurons of P(pre-activation > 0)
        "max_abs_cos_between_neurons": float(cos.max()),
    }


HOLD_LOOSE = 1e-2  # a student "roughly" holds a teacher neuron: enough to join its cluster


def student_copies(res, teacher, activation: str, X: np.ndarray) -> dict[str, Any]:
    """Do the trained students hold the teacher's neurons at all? Tells training failures from clustering ones.

    Students train on standardised queries, so the teacher's [w; b] is mapped to those
    coordinates first (x = σ·x' + μ gives [w∘σ, w·μ + b]). A student holds a teacher neuron
    exactly when one of its neurons is within the success bar (1 − |cos| < 1e-4), roughly
    when within 1e-2. ``students_ok``: every teacher neuron is held exactly by some student and
    roughly by at least ⌊γN⌋ students — the clustering had what it needed.
    """
    xs = Standardizer.fit(X)
    V = teacher.neuron_vectors(0)
    T = np.hstack([V[:, :-1] * xs.scale, (V[:, :-1] @ xs.mean + V[:, -1])[:, None]])
    nt = res.layers[0].neurons
    S = np.asarray(nt.column("vector").to_pylist(), dtype=float)
    sid = np.asarray(nt.column("student"))
    D = activations.get(activation).symmetry.distance(T, S)  # (r, M)
    exact = [int(np.unique(sid[row < SUCCESS_DW]).size) for row in D]
    rough = [int(np.unique(sid[row < HOLD_LOOSE]).size) for row in D]
    losses = dict(zip(res.students.column("student").to_pylist(), res.students.column("rel_loss").to_pylist()))
    best = min(losses, key=losses.get)
    cfg = res.config
    need = math.floor(cfg.gamma * cfg.n_students + 1e-9)  # ⌊γN⌋, as ecdist.cluster.min_students
    return {
        "students_holding_exactly": exact,  # per teacher neuron
        "students_holding_roughly": rough,
        "best_student_holds_all": bool((D[:, sid == best] < SUCCESS_DW).any(axis=1).all()),
        "min_students_needed": need,  # ⌊γN⌋
        "students_ok": bool(min(exact) >= 1 and min(rough) >= need),
    }


def _cos(V: np.ndarray) -> np.ndarray:
    Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
    return Vn @ Vn.T


def evaluate(network, teacher, activation: str, X_test: np.ndarray) -> dict[str, Any]:
    rep = ecdist.compare(network, teacher, activation, X=X_test)
    dw = np.asarray(rep.weight_distance[0], dtype=float)
    width = rep.layer_sizes[0]
    worst = float(rep.max_weight_distance[0])
    return {
        "recovered_width": width,
        "teacher_width": rep.teacher_sizes[0],
        "worst_dw": worst,
        "median_dw": float(np.median(dw)),
        "functional_mse": float(rep.functional_mse),
        "excess": rep.excess[0],
        "success": bool(width == rep.teacher_sizes[0] and worst < SUCCESS_DW),
    }


def run_one(t: dict[str, Any], rho: int, threads: int, with_rules: bool) -> dict[str, Any]:
    act, d, r, seed = t["activation"], t["d_in"], t["width"], t["seed"]
    teacher = ecdist.teachers.random_mlp([d, r, 1], act, seed=seed)
    n = n_queries(t)
    X = ecdist.queries.gaussian(n, d, seed=seed + 1000)
    X_test = ecdist.queries.gaussian(N_TEST, d, seed=seed + 2000)
    cfg = ecdist.Config(activation=act, student_widths=[rho * r], n_students=N_STUDENTS, seed=seed, threads=threads,
                        backend="local")  # one process per teacher, its threads pinned (see --threads)
    t0 = time.perf_counter()
    res = ecdist.recover(teacher, X, cfg)
    wall = time.perf_counter() - t0
    losses = np.asarray(res.students.column("rel_loss"))
    status = res.students.column("status").to_pylist()
    rec = {
        "teacher": teacher_id(t),
        **t,
        "rho": rho,
        "student_width": rho * r,
        "params_per_student": n_params(d, rho * r),
        "n_queries": n,
        "n_students": N_STUDENTS,
        **evaluate(res.network, teacher, act, X_test),
        "final_rel_mse": float(res.final_rel_mse),
        "students_best_rel_mse": float(losses.min()),
        "students_median_rel_mse": float(np.median(losses)),
        "students_status": {s: status.count(s) for s in sorted(set(status))},
        "students_restarts": (int(sum(res.students.column("restarts").to_pylist()))
                              if "restarts" in res.students.column_names else None),
        "lm_steps": int(max(res.students.column("steps").to_pylist())),
        "clusters_before_prune": int(res.layers[0].clusters.num_rows),
        "wall_s": wall,
        "timings": {k: float(v) for k, v in res.timings.items()},
        "teacher_profile": teacher_profile(teacher, act, X),
        "copies": student_copies(res, teacher, act, X),
    }
    if with_rules:
        rules = {"default": {k: rec[k] for k in ("recovered_width", "worst_dw", "median_dw", "functional_mse", "success")}}
        for name, changes in RULES.items():
            t1 = time.perf_counter()
            rc = ecdist.recluster(res, teacher, X, **changes)  # same students; threads from the run's config
            rules[name] = {**evaluate(rc.network, teacher, act, X_test), "final_rel_mse": float(rc.final_rel_mse),
                           "clusters": int(rc.layers[0].clusters.num_rows), "wall_s": time.perf_counter() - t1}
        rec["rules"] = rules
    return rec


def summarise(runs: list[dict[str, Any]], teachers: list[dict[str, Any]], rhos: list[int]) -> dict[str, Any]:
    ids = [teacher_id(t) for t in teachers]
    by = {(r["teacher"], r["rho"]): r for r in runs}
    acts = list(dict.fromkeys(t["activation"] for t in teachers))
    out: dict[str, Any] = {"success_rate": {}, "success_count": {}, "per_activation": {}, "complete": {},
                           "failures": {}}
    for rho in rhos:
        done = [by[(i, rho)] for i in ids if (i, rho) in by]
        out["complete"][str(rho)] = f"{len(done)}/{len(ids)}"
        out["success_count"][str(rho)] = sum(r["success"] for r in done)
        out["success_rate"][str(rho)] = (sum(r["success"] for r in done) / len(done)) if done else None
        fails = [r for r in done if not r["success"]]
        # "students": some teacher neuron was missing from the students (held exactly by none, or roughly
        # by fewer than ⌊γN⌋); "clustering": the students had it and clustering/reconstruction missed it
        out["failures"][str(rho)] = {
            "students": [r["teacher"] for r in fails if not r["copies"]["students_ok"]],
            "clustering": [r["teacher"] for r in fails if r["copies"]["students_ok"]],
        }
        for a in acts:
            sub = [r for r in done if r["activation"] == a]
            out["per_activation"].setdefault(a, {})[str(rho)] = (
                {"success": sum(r["success"] for r in sub), "runs": len(sub)} if sub else None
            )
    rho4 = [by[(i, 4)] for i in ids if (i, 4) in by and "rules" in by[(i, 4)]]
    if rho4:
        names = [n for n in rho4[0]["rules"] if all(n in r["rules"] for r in rho4)]  # resumed files may mix
        out["rules_rho4"] = {
            n: {
                "success": sum(r["rules"][n]["success"] for r in rho4),
                "exact_width": sum(r["rules"][n]["recovered_width"] == r["width"] for r in rho4),
                "runs": len(rho4),
                "teachers_recovered": [r["teacher"] for r in rho4 if r["rules"][n]["success"]],
            }
            for n in names
        }
        out["rules_rho4_head_to_head"] = {
            f"{a}_not_{b}": [r["teacher"] for r in rho4 if r["rules"][a]["success"] and not r["rules"][b]["success"]]
            for a, b in (("stable", "reference_pi6"), ("reference_pi6", "stable"),
                         ("default", "reference_pi6_prune"), ("reference_pi6_prune", "default"))
            if a in names and b in names
        }
    out["paper_rho4"] = PAPER_RHO4
    out["wall_s_total"] = sum(r["wall_s"] + sum(v.get("wall_s", 0.0) for v in r.get("rules", {}).values()) for r in runs)
    return out


def plot(data: dict[str, Any], path: Path) -> None:
    plt = _common.pyplot()

    runs, summ = data["runs"], data["summary"]
    rhos = [int(r) for r in summ["success_rate"] if summ["success_rate"][r] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.2), gridspec_kw={"width_ratios": [1, 1.2, 1.2]})
    ax = axes[0]
    for i, (a, per) in enumerate(summ["per_activation"].items()):
        xs = [rho for rho in rhos if per.get(str(rho))]
        ys = [per[str(rho)]["success"] / per[str(rho)]["runs"] for rho in xs]
        ax.plot(np.array(xs) * 2 ** ((i - 3) * 0.03), ys, "o-", lw=1, ms=4, alpha=0.8, label=a)
    ax.plot(rhos, [summ["success_rate"][str(r)] for r in rhos], "ks-", lw=2.5, ms=7, label="all teachers")
    ax.axhline(PAPER_RHO4, color="grey", ls="--", lw=1)
    ax.text(max(rhos), PAPER_RHO4 + 0.02, "paper: 80% at ρ = 4", color="grey", fontsize=8, ha="right")
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(rhos) / 1.5, max(rhos) * 1.5)
    ax.set_xticks(rhos)
    ax.set_xticklabels([str(r) for r in rhos])
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("ρ (student width / teacher width)")
    ax.set_ylabel("success rate (exact width, all 1−|cos| < 1e-4)")
    ax.set_title(f"recovery suite: {len({r['teacher'] for r in runs})} teachers, N = {N_STUDENTS}")
    ax.legend(fontsize=7, ncol=2, loc="upper left")

    ax = axes[1]
    ids = list(dict.fromkeys(r["teacher"] for r in runs))
    marks = {1: "v", 2: "s", 4: "o"}
    for rho in rhos:
        sub = [r for r in runs if r["rho"] == rho]
        x = [ids.index(r["teacher"]) + (rho - 2) * 0.08 for r in sub]
        y = [max(r["worst_dw"], 1e-17) for r in sub]
        c = ["C2" if r["success"] else ("C1" if r["recovered_width"] == r["width"] else "C3") for r in sub]
        ax.scatter(x, y, c=c, marker=marks.get(rho, "o"), s=28, label=f"ρ = {rho}", edgecolors="k", linewidths=0.3)
    ax.axhline(SUCCESS_DW, color="grey", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels(ids, rotation=90, fontsize=6)
    ax.set_ylabel("worst 1 − |cos| over teacher neurons")
    ax.set_title("per teacher (green: success, orange: width ok, red: wrong width)")
    ax.legend(fontsize=7)

    ax = axes[2]
    rr = summ.get("rules_rho4")
    if rr:
        names = list(rr)
        labels = {"default": "stable\n+ prune\n(default)", "stable": "stable",
                  "reference_pi6": "reference\nπ/6", "reference_pi3": "reference\nπ/3",
                  "reference_pi6_drop": "reference\nπ/6\n+ drop", "reference_pi6_prune": "reference\nπ/6\n+ prune"}
        succ = [rr[n]["success"] for n in names]
        width = [rr[n]["exact_width"] for n in names]
        x = np.arange(len(names))
        ax.bar(x - 0.2, width, 0.4, label="exact width", color="C0", alpha=0.6)
        ax.bar(x + 0.2, succ, 0.4, label="success", color="C2")
        for xi, s in zip(x, succ):
            ax.text(xi + 0.2, s + 0.2, str(s), ha="center", fontsize=8)
        ax.axhline(rr[names[0]]["runs"], color="grey", ls=":", lw=1)
        ax.set_xticks(x)
        ax.set_xticklabels([labels.get(n, n) for n in names], fontsize=8)
        ax.set_ylabel(f"teachers (of {rr[names[0]]['runs']})")
        ax.set_title("ρ = 4: clustering rules on the same students")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK)} cheap teachers at ρ = 4 only (smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/recovery_suite.json, or recovery_suite_quick.json)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    p.add_argument("--rho", type=int, nargs="+", default=None, help="override the ρ values (default 1 2 4)")
    p.add_argument("--only", nargs="+", default=None, help="teacher ids to run (e.g. tanh-8-4-s202)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON at --out and exit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: deterministic, and best on shared cores)")
    args = p.parse_args(argv)

    teachers = [t for t in TEACHERS if teacher_id(t) in QUICK] if args.quick else list(TEACHERS)
    if args.only:
        unknown = set(args.only) - {teacher_id(t) for t in TEACHERS}
        if unknown:
            p.error(f"unknown teacher ids {sorted(unknown)}; known: {[teacher_id(t) for t in TEACHERS]}")
        teachers = [t for t in TEACHERS if teacher_id(t) in args.only]
    rhos = args.rho or ([4] if args.quick else list(RHOS))
    out = args.out or _common.RESULTS / ("recovery_suite_quick.json" if args.quick else "recovery_suite.json")

    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
        return 0
    runs: list[dict[str, Any]] = []
    earlier: list[dict[str, Any]] = []  # machine records of the invocations a resumed file came from
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        runs = [r for r in old.get("runs", []) if r["n_queries"] == n_queries(r) and r["n_students"] == N_STUDENTS]
        earlier = old.get("earlier_invocations", []) + [
            old["machine"] | {"wall_s": old.get("suite_wall_s_this_invocation")}
        ]
        print(f"resume: {len(runs)} finished runs kept from {out}", flush=True)
    done = {(r["teacher"], r["rho"]) for r in runs}
    machine = _common.machine_info()
    t_start = time.perf_counter()

    def save() -> dict[str, Any]:
        order = {(teacher_id(t), rho): i for i, (t, rho) in enumerate((t, rho) for t in TEACHERS for rho in RHOS)}
        runs.sort(key=lambda r: order.get((r["teacher"], r["rho"]), 1 << 30))
        data = {
            "benchmark": "recovery_suite",
            "description": __doc__.split("\n\n")[0],
            "protocol": {
                "success": f"recovered width == teacher width and worst 1-|cos| < {SUCCESS_DW:g}",
                "rhos": rhos,
                "n_students": N_STUDENTS,
                "queries": f"gaussian(n, d_in, seed + 1000), n = max({MIN_QUERIES}, {QUERIES_PER_PARAM} * P4), "
                           "P4 = 4*width*(d_in+2)+1 (one rho=4 student); the same X for every rho",
                "test": f"gaussian({N_TEST}, d_in, seed + 2000)",
                "students": "ecdist.Config(activation, student_widths=[rho*width], n_students=10, seed=seed, "
                            f"threads={args.threads}); other fields at their defaults",
                "config_defaults": ecdist.Config(activation="tanh", student_widths=[1]).to_dict()
                | {"activation": None, "student_widths": None},
                "rules_rho4": {"default": "the run itself (stable rule, prune=True)",
                               **{k: dict(v) for k, v in RULES.items()}},
                "quick": args.quick,
            },
            "teachers": [t | {"id": teacher_id(t), "P4": n_params(t["d_in"], 4 * t["width"]),
                              "n_queries": n_queries(t)} for t in teachers],
            "summary": summarise(runs, teachers, rhos),
            "runs": runs,
            "suite_wall_s_this_invocation": time.perf_counter() - t_start,
            "machine": machine,
            "earlier_invocations": earlier,
        }
        _common.write_json(out, data)
        return data

    for t in teachers:
        for rho in rhos:
            if (teacher_id(t), rho) in done:
                continue
            rec = run_one(t, rho, args.threads, with_rules=(rho == 4))
            runs.append(rec)
            rules = ""
            if "rules" in rec:
                rules = "  rules: " + " ".join(f"{n}={'ok' if v['success'] else 'x'}({v['recovered_width']})"
                                               for n, v in rec["rules"].items())
            print(f"{rec['teacher']:<20} ρ={rho}  width {rec['recovered_width']:>2}/{t['width']:<2} "
                  f"worst {rec['worst_dw']:.1e}  fmse {rec['functional_mse']:.1e}  "
                  f"students best {rec['students_best_rel_mse']:.0e} med {rec['students_median_rel_mse']:.0e}  "
                  f"{'OK  ' if rec['success'] else 'FAIL'} {rec['wall_s']:6.1f}s{rules}", flush=True)
            save()
    data = save()
    plot(data, out.with_suffix(".png"))
    s = data["summary"]
    print("success rate per ρ: " + ", ".join(f"ρ={r}: {s['success_count'][r]}/{s['complete'][r].split('/')[1]}"
                                             for r in s["success_rate"]))
    if "rules_rho4" in s:
        print("ρ = 4 rules: " + ", ".join(f"{n}: {v['success']}/{v['runs']}" for n, v in s["rules_rho4"].items()))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
