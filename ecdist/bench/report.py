"""``report.md``: every benchmark JSON of a folder as tables and plots, the scaling model, and earlier GPU/large figures.

The report is rebuilt from the JSON files alone, so it can be regenerated, and a GPU run
(``students_gpu.json``) and a CPU run can share one folder. Figures measured earlier by the
scripts in benchmarks/ (benchmarks/results/*.json) are shown in their own section, with the
command, date and machine that produced them.
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

from ..students import n_params
from . import model, plots
from .clustering import fits, loglog_fit, m_log_m_slope
from .common import ROOT, write_json
from .students import MNIST_TEACHER_WIDTH

EARLIER = ROOT / "benchmarks" / "results"
MODULES = {"students": "students", "students_gpu": "students", "actors": "actors", "cluster": "clustering",
           "recovery": "recovery", "quality": "recovery"}
GPU_QUERIES, GPU_WIDTHS = 8192, (784, 256, 10)  # benchmarks/scaling_students_gpu.py's students


def describe(name: str) -> str:
    """The first paragraph of the benchmark's module docstring (what it measures), for its JSON."""
    doc = importlib.import_module(f"{__package__}.{MODULES[name]}").__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def targets() -> list[model.Target]:
    """The issue's targets beyond this machine (their widths are the students', which set the cost)."""
    return [
        model.Target("MNIST 784-256-10, N = 50, 8 GPUs", (784, 256, 10), 50, 8),
        model.Target("MNIST 784-1024-10, N = 200, 8 GPUs", (784, 1024, 10), 200, 8),
        model.Target("MNIST 784-1024-10, N = 200, 1 GPU", (784, 1024, 10), 200, 1),
    ]


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def gpu_profile(out: Path) -> model.TrainingProfile | None:
    """Adam rates of one GPU: this folder's students_gpu.json, else the earlier H200 run (float64 rows)."""
    own = _load(out / "students_gpu.json")
    if own is not None and own["results"]["cost"]:
        return model.TrainingProfile.from_rows(own["results"]["device"], own["results"]["cost"], "students_gpu.json (this folder)")
    old = _load(EARLIER / "scaling_students_gpu.json")
    if old is None:
        return None
    P = n_params(GPU_WIDTHS)
    rows = [{"N": r["N"], "params_per_student": P, "sample_params_per_s": r["students_epochs_per_s"] * GPU_QUERIES * P}
            for r in old["stacked"] if r["dtype"] == "float64"]
    return model.TrainingProfile.from_rows(
        old["gpu"], rows, f"benchmarks/results/scaling_students_gpu.json ({old['gpu']}, {old.get('date', '?')}, float64)")


def cluster_profile(out: Path) -> model.ClusterProfile | None:
    """FAISS time fit at the largest dimension: the earlier full run (up to 10⁶ vectors) if present, else this run's."""
    for path, label in ((EARLIER / "scaling_cluster.json", "benchmarks/results/scaling_cluster.json"),
                        (out / "cluster.json", "cluster.json (this run)")):
        data = _load(path)
        if data is None:
            continue
        rows = data["rows"] if "rows" in data else data["results"]["rows"]
        dim = max(r["dim"] for r in rows)
        ok = [r for r in rows if r["dim"] == dim and r.get("faiss", {}).get("status") == "ok"]
        fit = loglog_fit([r["rows"] for r in ok], [r["faiss"]["time_s"] for r in ok])
        if fit is not None:
            m = data["machine"]
            machine = f"{m['processor']}, {m['cpu_affinity']} cores"
            return model.ClusterProfile(fit["a"], fit["slope"], dim, machine,
                                        f"{label}: FAISS at D = {dim}, M = {fit['m_min']:,.0f}–{fit['m_max']:,.0f} "
                                        f"({machine}, {m['date'][:10]})")
    return None


def write(out: Path) -> Path:
    """Plots, ``model.json`` and ``report.md`` from the benchmark JSONs in ``out``."""
    data = {name: _load(out / f"{name}.json") for name in MODULES}
    parts = [_header(data)]
    sections = {"students": (_students, plots.students), "students_gpu": (_students, plots.students),
                "actors": (_actors, plots.actors), "cluster": (_cluster, plots.cluster),
                "recovery": (_recovery, plots.recovery), "quality": (_quality, plots.quality)}
    for name, (text, figure) in sections.items():
        if data[name]:
            parts.append(text(data[name], figure(data[name]["results"], out / f"{name}.png")))
    parts.append(_model(out, data["students"]))
    parts.append(_earlier())
    path = out / "report.md"
    path.write_text("\n\n".join(p.strip() for p in parts if p) + "\n")
    return path


# ----- sections ---------------------------------------------------------------------------------
def _header(data: dict[str, Any]) -> str:
    runs = [d for d in data.values() if d]
    if not runs:
        return "# ecdist bench\n\nNo benchmark JSON in this folder."
    m = runs[0]["machine"]
    commit = (m["git_commit"] or "unknown")[:10] + (" (uncommitted changes)" if m["git_dirty"] else "")
    lines = [
        f"# ecdist bench — scale `{runs[0]['scale']}`",
        "",
        f"`{m['command']}` on {m['date'][:16].replace('T', ' ')} UTC: {m['processor']}, {m['cpu_affinity']} cores "
        f"(affinity), {m['platform']}; Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, "
        f"ecdist {m['ecdist']}; git commit `{commit}`, source hash `{m['ecdist_source_sha256']}`"
        + (f"; GPU: {m['cuda']}" if m["cuda"] else "") + ".",
        "",
        "Timings on shared cores are noisy: every comparison below is a ratio of two figures measured in "
        "the same run, and the load average (1, 5, 15 min) before and after each benchmark says how busy "
        "the machine was.",
        "",
        "| benchmark | wall time | load before | load after |",
        "|---|---|---|---|",
    ]
    for name, d in data.items():
        if d:
            lines.append(f"| {name} | {d['wall_s']:.0f} s | {_load_str(d['load_before'])} | {_load_str(d['load_after'])} |")
    total = sum(d["wall_s"] for d in runs)
    lines.append(f"| **all** | **{total:.0f} s ({total / 60:.1f} min)** | | |")
    return "\n".join(lines)


def _students(d: dict[str, Any], png: Path) -> str:
    r = d["results"]
    lines = [
        *_section(f"## Students per second: one stacked pack vs a per-student loop ({r['device']})", png),
        f"Adam (lr 1e-3, batch 512), {r['dtype']}, {d['config']['epochs']} timed epochs after one warm-up, "
        f"{d['config']['stack_queries']:,} queries of a tanh {'-'.join(map(str, r['teacher']))} teacher, "
        f"students {r['teacher'][0]}-w-{r['teacher'][-1]}"
        + (", one torch thread." if r["torch_threads"] == 1 else "."),
        "",
        "| N | width | stacked students·epochs/s | loop students·epochs/s | stacked / loop |",
        "|---|---|---|---|---|",
    ]
    for s in r["stacked_vs_loop"]:
        lines.append(f"| {s['N']} | {s['width']} | {s['stacked_students_epochs_per_s']:,.0f} | "
                     f"{s['loop_students_epochs_per_s']:,.0f} | **{s['ratio']:.2f}×** |")
    lines += [
        "",
        f"Cost per student, MNIST-shaped students 784-w-10 (queries of a 784-{MNIST_TEACHER_WIDTH}-10 teacher), one "
        "stacked pack of N: the sample·parameters/s column is what the scaling model below extrapolates.",
        "",
        "| width | P | queries n | N | students·epochs/s | sample·parameters/s |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["cost"]:
        lines.append(f"| {c['width']} | {c['params_per_student']:,} | {c['queries']:,} | {c['N']} | "
                     f"{c['students_epochs_per_s']:.3g} | {c['sample_params_per_s']:.3g} |")
    lm = r["lm"]
    lines += ["", f"Levenberg–Marquardt (ecdist's optimiser for students up to 2,500 parameters), {lm['N']} students "
              f"{'-'.join(map(str, lm['widths']))} (P = {lm['params_per_student']}), {lm['queries']:,} queries: "
              f"**{lm['student_iterations_per_s']:,.0f} student-iterations/s** ({lm['iterations']} iterations in "
              f"{lm['seconds']:.1f} s)."]
    return "\n".join(lines)


def _actors(d: dict[str, Any], png: Path) -> str:
    r = d["results"]
    lines = [
        *_section("## Students per second vs Ray actors", png),
        f"{r['students']} students of width {r['width']} ({r['queries']:,} queries), {r['lm_iterations']} "
        "Levenberg–Marquardt iterations each with no early stop (the same work in every run), one CPU per "
        "actor. Throughput counts the training once the actors are up; the actors' start (a new process "
        "that imports torch, paid once per recovery) is in the last columns. Ray's own start is not counted.",
        "",
        "| Ray | 1 actor | 2 actors | speed-up (ideal 2) | actors' start, 1 / 2 | speed-up with the start "
        "| nodes used by the 2 actors |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("local", "cluster"):
        if mode in r:
            x = r[mode]
            lines.append(f"| {x['setup']} | {x['one']['train_s']:.1f} s ({x['one']['students_per_s']:.2f} students/s) | "
                         f"{x['two']['train_s']:.1f} s ({x['two']['students_per_s']:.2f} students/s) | "
                         f"**{x['ratio']:.2f}×** | {x['one']['start_s']:.1f} s / {x['two']['start_s']:.1f} s | "
                         f"{x['ratio_end_to_end']:.2f}× | {len(x['two']['nodes'])} |")
    cores = d["machine"]["cpu_affinity"]
    lines += ["", f"This machine has {cores} cores for the driver, Ray's processes and the actors together, so two "
              "one-CPU actors cannot reach 2× here; the ratio says how close they get."]
    return "\n".join(lines)


def _cluster(d: dict[str, Any], png: Path) -> str:
    r = d["results"]
    lines = [
        *_section("## Clustering time and memory vs M: scipy vs FAISS", png),
        "Perfect-student layers (W = 400 neurons per student, a quarter of them the teacher's), stable rule, "
        "γ = 0.5, β = π/3, each measurement in a fresh process; memory is the step's peak resident memory "
        "above what the process held before it.",
        "",
        "| M | D | FAISS s | FAISS MB | scipy s | scipy MB | scipy / FAISS | same clusters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        f, s = row.get("faiss", {}), row.get("scipy", {})
        lines.append(f"| {row['rows']:,} | {row['dim']} | {_t(f)} | {_mb(f)} | {_t(s)} | {_mb(s)} | "
                     + (f"**{row['ratio']:.1f}×** | {row['identical']} |" if "ratio" in row else "— | — |"))
    lines += ["", *_slopes(r["fits"])]
    return "\n".join(lines)


def _slopes(fits: dict[str, Any]) -> list[str]:
    """Time and memory slopes per backend and D: over the whole range, and between the two largest M."""
    lines = ["Fitted log-log slopes, time ∝ M^slope: M² is a slope of 2, M log M a slope a little above 1 (its value "
             "over each range is given); fixed costs flatten the small-M end, so the slope between the two largest "
             "M is the one to extrapolate with. Memory: the step's peak resident memory (FAISS's C++ side "
             "included) and numpy's allocations alone (tracemalloc).", "",
             "| backend, D | M range | time slope | M log M would be | two largest M: slope (M log M) | "
             "memory slope | numpy memory slope |", "|---|---|---|---|---|---|---|"]
    for key, fit in fits.items():
        t, top = fit["time"], fit.get("time_two_largest")
        span = f"{t['m_min']:,.0f}–{t['m_max']:,.0f}" if t else "—"
        mlogm = f"{m_log_m_slope(t['m_min'], t['m_max']):.2f}" if t else "—"
        last = f"{top['slope']:.2f} ({m_log_m_slope(top['m_min'], top['m_max']):.2f})" if top else "—"
        lines.append(f"| {key.replace('_d', ', D = ')} | {span} | **{_slope(t)}** | {mlogm} | {last} | "
                     f"{_slope(fit['peak_rss_mb'])} | {_slope(fit['traced_peak_mb'])} |")
    return lines


def _recovery(d: dict[str, Any], png: Path) -> str:
    r = d["results"]
    lines = [
        *_section("## End-to-end recovery time vs teacher width and depth", png),
        f"`ecdist.recover` in-process (one thread), {r['activation']} teachers, students ρ = {r['rho']} times as "
        f"wide, N = {r['n_students']}, queries n = max(1000, 5·P).",
        "",
        "Against the teacher's width:",
        "",
        _run_table(r["width"]),
        "",
        "Against its depth (deep students trained by Levenberg–Marquardt often stall short of the precision "
        "clustering needs: see the README's known limits):",
        "",
        _run_table(r["depth"]),
    ]
    return "\n".join(lines)


def _quality(d: dict[str, Any], png: Path) -> str:
    r = d["results"]
    return "\n".join([
        *_section("## Quality vs ρ and N", png),
        f"Overhead (K − r)/r and worst 1 − |cos| (teacher neuron to nearest recovered neuron, on the first layer); "
        f"ρ swept at N = {r['rho_sweep_n_students']}, N swept at ρ = {r['n_sweep_rho']}. Success: right width and "
        "every neuron within 1e-4.",
        "",
        "ρ sweep:",
        "",
        _run_table(r["rho_sweep"]),
        "",
        "N sweep:",
        "",
        _run_table(r["n_sweep"]),
    ])


def _model(out: Path, students: dict[str, Any] | None) -> str:
    gpu, clus = gpu_profile(out), cluster_profile(out)
    lines = ["## Scaling model: beyond this machine", "",
             "From `ecdist.bench.model.estimate` (its docstring is the full list of assumptions):", ""]
    lines += ["> " + line.strip() for line in (model.estimate.__doc__ or "").strip().splitlines()[2:]]
    if gpu is None or clus is None:
        return "\n".join(lines + ["", "Not estimated: needs a GPU training profile and a FAISS fit, and this folder "
                                  "and benchmarks/results/ hold neither."])
    rows = [(t, gpu, model.USD_PER_GPU_HOUR) for t in targets()]
    if students:
        cpu = model.TrainingProfile.from_rows(f"1 thread of {students['machine']['processor']}",
                                              students["results"]["cost"], "students.json (this run, one thread)")
        cores = students["machine"]["cpu_affinity"] or 1
        rows.append((model.Target(f"MNIST 784-256-10, N = 50, this machine ({cores} cores)", (784, 256, 10), 50, cores),
                     cpu, 0.0))
    estimates = [model.estimate(t, prof, clus, price) for t, prof, price in rows]
    write_json(out / "model.json", {"estimates": estimates, "usd_per_gpu_hour": model.USD_PER_GPU_HOUR,
                                    "gpu_profile": gpu.__dict__, "cluster_profile": clus.__dict__})
    lines += [
        "",
        f"Inputs: training rates of one GPU from {gpu.source}; of one CPU core from this run's cost table; "
        f"clustering t = {clus.a:.3g}·M^{clus.slope:.2f} s from {clus.source}. Price: "
        f"**${model.USD_PER_GPU_HOUR:.2f} per GPU-hour** (assumed, for an H100/H200-class GPU; the cost scales "
        f"linearly with it). Epochs: {model.REFERENCE_EPOCHS:,} per student (the reference's cap, an upper "
        f"bound), n = {model.MNIST_QUERIES:,} queries. The architectures are the students' (what is trained): "
        "784-256-10 students suit a teacher of 64–85 hidden neurons at ρ = 3–4; a 784-256-10 teacher at ρ = 4 "
        "needs 784-1024-10 students.",
        "",
        "| target | students per device | training | clustering (CPU FAISS) | total | device-hours | cost | dominant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in estimates:
        cost = f"${e['usd']:,.0f}" if e["usd_per_device_hour"] else "—"
        lines.append(f"| {e['target']['name']} | {e['students_per_device']} "
                     f"({'saturated' if e['saturated'] else 'below saturation'}) | {_dur(e['train_s'])} | "
                     f"{_dur(e['cluster_s'])} ({e['cluster_layers'][0]['vectors']:,} vectors) | {_dur(e['total_s'])} | "
                     f"{e['device_hours']:,.1f} | {cost} | **{e['dominant']}** |")
    share = [e["train_s"] / e["cluster_s"] for e in estimates if e["usd_per_device_hour"]]
    lines += ["", f"Training takes {min(share):,.0f}–{max(share):,.0f}× as long as clustering on the GPU targets: "
              "the students' epochs decide the bill, and clustering (even on the 2-core CPU the fit comes from) "
              "is minutes. Below saturation (fewer students per GPU than fill it) more GPUs cost more GPU-hours for "
              "the same work; at the epoch cap these are upper bounds, linear in the epochs the students need."]
    return "\n".join(lines)


def _earlier() -> str:
    gpu, clus = _load(EARLIER / "scaling_students_gpu.json"), _load(EARLIER / "scaling_cluster.json")
    clus_gpu = _load(EARLIER / "scaling_cluster_gpu.json")
    if gpu is None and clus is None and clus_gpu is None:
        return ""
    lines = ["## Measured earlier (not by this run)", "",
             "Larger figures from the scripts in `benchmarks/`, kept in `benchmarks/results/`; they were not "
             "re-measured by `ecdist bench`."]
    if gpu is not None:
        Ns = sorted({r["N"] for r in gpu["stacked"]})
        lines += ["", f"**Students per second on one {gpu['gpu']}** ({gpu.get('date', '?')}, torch {gpu['torch']}; "
                  f"`{gpu.get('command', 'benchmarks/scaling_students_gpu.py')}`): Adam, students "
                  f"{gpu['d_in']}-{gpu['width']}-{gpu['d_out']}, {gpu['queries']:,} queries, stacked packs of N.", "",
                  "| dtype | " + " | ".join(f"N = {n}" for n in Ns) + " | loop, N = 16 | stacked / loop at N = 16 |",
                  "|---" * (len(Ns) + 3) + "|"]
        for dt in ("float32", "float64"):
            rate = {r["N"]: r["students_epochs_per_s"] for r in gpu["stacked"] if r["dtype"] == dt}
            loop = next((r["students_epochs_per_s"] for r in gpu.get("loop", []) if r["dtype"] == dt), math.nan)
            lines.append(f"| {dt} | " + " | ".join(f"{rate[n]:,.0f}" for n in Ns) + f" | {loop:,.0f} | "
                         f"{rate.get(16, math.nan) / loop:.1f}× |")
        if "lm" in gpu:
            lm = gpu["lm"]
            lines.append(f"\nLevenberg–Marquardt on the GPU: {lm['student_iterations_per_s']:,.0f} student-iterations/s "
                         f"({lm['N']} students {'-'.join(map(str, lm['arch']))}, {lm['queries']:,} queries).")
        if "shared_gpu" in gpu:
            sh = gpu["shared_gpu"]
            lines.append(f"Four packs of {sh['N'] // 4} sharing the GPU vs one pack of {sh['N']}: {sh['speedup']:.2f}×.")
    if clus is not None:
        m = clus["machine"]
        lines += ["", f"**FAISS vs scipy up to 10⁶ vectors** ({m['processor']}, {m['cpu_affinity']} cores, "
                  f"{m['date'][:10]}, commit `{(m['git_commit'] or '?')[:10]}`; `{m['command']}`):", "",
                  "| M | D | FAISS s | FAISS MB | scipy s | scipy / FAISS |", "|---|---|---|---|---|---|"]
        for row in clus["rows"]:
            f, s = row.get("faiss", {}), row.get("scipy", {})
            lines.append(f"| {row['rows']:,} | {row['dim']} | {_t(f)} | {_mb(f)} | {_t(s)} | "
                         + (f"{row['ratio']:.0f}× |" if "ratio" in row else "— |"))
        lines += ["", *_slopes(clus.get("fits") or fits(clus["rows"]))]
    if clus_gpu is not None:
        m = clus_gpu["machine"]
        lines += ["", f"**Clustering on one {m['cuda']}** with the exact torch kNN search (faiss-gpu's wheels need "
                  f"CUDA 12; that machine has CUDA 13 and no FAISS; {m['date'][:10]}, torch {m['torch']}, "
                  f"{m['cpu_affinity']} CPU cores for the rest of the pipeline; `{m['command']}`):", "",
                  "| M | D | total s | kNN s | GPU peak MB | clusters (certified exact) |", "|---|---|---|---|---|---|"]
        for row in clus_gpu["rows"]:
            g = row.get("gpu", {})
            if g.get("status") == "ok":
                lines.append(f"| {row['rows']:,} | {row['dim']} | {g['total_s']:.1f} | {g['knn_s']:.1f} | "
                             f"{g['gpu_peak_mb']:,.0f} | {g['clusters']} ({g['exact_clusters']}) |")
    return "\n".join(lines)


# ----- formatting -------------------------------------------------------------------------------
def _section(title: str, png: Path) -> list[str]:
    """A section's heading and its plot."""
    return [title, "", f"![{png.stem}]({png.name})", ""]


def _run_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| teacher | students | N | queries | time | train / cluster | recovered | overhead | worst 1−\\|cos\\| | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher = f"{r['activation']} {'-'.join(map(str, r['arch']))} (seed {r['seed']})"
        head = f"| {teacher} | {r['student_widths']} | {r['n_students']} | {r['queries']:,} | {r['seconds']:.1f} s |"
        if r["status"] != "ok":
            lines.append(head + f" | failed: {r['error'][:70]}… | | | ✗ |")
            continue
        t = r["timings"]
        lines.append(head + f" {t.get('train', 0):.1f} / {t.get('cluster', 0):.1f} s | {r['layer_sizes']} | "
                     + ", ".join(f"{o:+.0%}" for o in r["overhead"]) + " | "
                     + ", ".join(f"{w:.1e}" for w in r["worst_1_minus_cos"]) + f" | {'✓' if r['success'] else '✗'} |")
    return "\n".join(lines)


def _load_str(load: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load) if load else "?"


def _t(r: dict[str, Any]) -> str:
    if not r:
        return "—"
    return f"{r['time_s']:.2f}" if r.get("status") == "ok" else r.get("status", "—")


def _mb(r: dict[str, Any]) -> str:
    return f"{r['peak_rss_mb']:.0f}" if r.get("status") == "ok" else "—"


def _slope(fit: dict[str, Any] | None) -> str:
    return f"{fit['slope']:.2f}" if fit else "—"


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
