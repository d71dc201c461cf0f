"""``ecdist bench``: a tiny end-to-end run through the CLI, and the arithmetic of the scaling model.

No test here times anything: the model tests check `ecdist.bench.model` on made-up profiles, and
the tiny run's tests check that its JSON is consistent (ratios = a / b of the same run, wall_s > 0).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ecdist
from ecdist.bench import model
from ecdist.bench.clustering import fits, loglog_fit, m_log_m_slope
from ecdist.cli import build_parser

ROOT = Path(ecdist.__file__).resolve().parent.parent
FLAT = model.TrainingProfile("saturated device", (1.0, 1e12), (1e9, 1e9), "test")  # the same rate at any step size
LINEAR = model.ClusterProfile(a=1e-3, slope=1.0, dim=785, machine="test", source="test")


def target(N: int = 8, devices: int = 2, widths: tuple[int, ...] = (784, 256, 10)) -> model.Target:
    return model.Target("t", widths, N, devices, queries=100, epochs=10)


# ----- the scaling model -----------------------------------------------------------------------
def test_estimate_by_hand():
    e = model.estimate(target(), FLAT, LINEAR, usd_per_device_hour=2.0)
    P = 784 * 256 + 256 + 256 * 10 + 10
    assert e["params_per_student"] == P == 203_530
    assert e["students_per_device"] == 4
    assert e["train_s"] == pytest.approx(10 * 4 * 100 * P / 1e9)  # epochs · k · n · P / rate
    assert e["cluster_layers"] == [{"vectors": 8 * 256, "dim": 785, "seconds": pytest.approx(1e-3 * 8 * 256)}]
    assert e["total_s"] == pytest.approx(e["train_s"] + e["cluster_s"])
    assert e["device_hours"] == pytest.approx(2 * e["total_s"] / 3600)
    assert e["usd"] == pytest.approx(2.0 * e["device_hours"])
    assert e["dominant"] == "clustering"  # 2 s of clustering against 0.8 s of training
    assert model.estimate(target(), FLAT, model.ClusterProfile(1e-9, 1.0, 785, "test", "test"))["dominant"] == "training"


def test_model_training_estimate_scales_with_students_and_devices():
    t = model.estimate(target(N=8), FLAT, LINEAR)["train_s"]
    assert model.estimate(target(N=16), FLAT, LINEAR)["train_s"] == pytest.approx(2 * t)  # doubling N doubles it
    assert model.estimate(target(N=16, devices=4), FLAT, LINEAR)["train_s"] == pytest.approx(t)  # … unless devices double
    assert model.estimate(model.Target("t", (784, 256, 10), 8, 2, 100, 20), FLAT, LINEAR)["train_s"] == pytest.approx(2 * t)
    # a device far from saturation takes the same time per step whatever the pack: more students are free
    idle = model.TrainingProfile("gpu", (1e12,), (1e9,), "test")
    assert model.estimate(target(N=16), idle, LINEAR)["train_s"] == pytest.approx(model.estimate(target(N=8), idle, LINEAR)["train_s"])


def test_model_clustering_estimate_grows_as_the_fit_says():
    prof = model.ClusterProfile(a=2e-6, slope=1.6, dim=785, machine="test", source="test")
    c = model.estimate(target(N=50), FLAT, prof)["cluster_s"]
    assert model.estimate(target(N=100), FLAT, prof)["cluster_s"] == pytest.approx(2**1.6 * c)
    assert c == pytest.approx(2e-6 * (50 * 256) ** 1.6)
    # dimension: linear in D / D of the fit; a deep target clusters each hidden layer once
    deep = model.estimate(target(widths=(392, 256, 256, 10)), FLAT, prof)["cluster_layers"]
    assert [(layer["vectors"], layer["dim"]) for layer in deep] == [(8 * 256, 393), (8 * 256, 257)]
    assert deep[0]["seconds"] == pytest.approx(2e-6 * (8 * 256) ** 1.6 * 393 / 785)


def test_training_rate_interpolates_between_measured_points():
    prof = model.TrainingProfile.from_rows("gpu", [
        {"N": 4, "params_per_student": 100, "sample_params_per_s": 1e8},
        {"N": 1, "params_per_student": 100, "sample_params_per_s": 1e7},
        {"N": 1, "params_per_student": 100, "sample_params_per_s": 2e7},  # the best rate per step size counts
    ], "test")
    assert prof.work == (100.0, 400.0) and prof.rate == (2e7, 1e8)
    assert model.training_rate(prof, 200.0) == pytest.approx(math.sqrt(2e7 * 1e8))  # log-log midpoint
    assert model.training_rate(prof, 50.0) == pytest.approx(1e7)  # below: rate ∝ work
    assert model.training_rate(prof, 1e6) == pytest.approx(1e8)  # above: saturated


def test_loglog_fits():
    ms = [1e3, 1e4, 1e5]
    fit = loglog_fit(ms, [3e-9 * m**2 for m in ms])
    assert fit["slope"] == pytest.approx(2.0) and fit["a"] == pytest.approx(3e-9)
    assert loglog_fit([1e3], [1.0]) is None and loglog_fit([1e3, 1e4], [0.0, 1.0]) is None
    assert 1.0 < m_log_m_slope(1e4, 1e6) < 1.1
    rows = [{"rows": m, "dim": 65, "faiss": {"status": "ok", "time_s": m * math.log(m) * 1e-6, "peak_rss_mb": 0.0,
                                             "traced_peak_mb": m * 1e-3}} for m in ms]
    f = fits(rows)["faiss_d65"]
    assert f["time"]["slope"] == pytest.approx(f["m_log_m_slope"], abs=0.01)
    assert f["peak_rss_mb"] is None and f["traced_peak_mb"]["slope"] == pytest.approx(1.0)


def test_bench_cli_hides_the_tiny_scale():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    assert "tiny" not in sub.format_help() and "small" in sub.format_help()
    assert sub.parse_args(["--scale", "tiny"]).scale == "tiny"


# ----- a tiny end-to-end run through the CLI ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ecdist.cli", "bench", "--scale", "tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_tiny_writes_jsons_report_and_plots(tiny_run):
    out, proc = tiny_run
    assert "report:" in proc.stdout
    for name in ("students", "actors", "cluster", "recovery", "quality"):
        d = json.loads((out / f"{name}.json").read_text())
        assert d["benchmark"] == name and d["scale"] == "tiny" and d["wall_s"] > 0 and d["config"]
        assert len(d["load_before"]) == 3 and len(d["load_after"]) == 3
        m = d["machine"]
        assert m["torch"] and m["cpu_count"] >= 1 and re.fullmatch(r"[0-9a-f]{16}", m["ecdist_source_sha256"])
        if (ROOT / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}", m["git_commit"])
        assert _png(out / f"{name}.png")
    report = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert _png(out / image), image
    assert "## Scaling model" in report and "784-1024-10" in report
    assert json.loads((out / "model.json").read_text())["estimates"]


@pytest.mark.slow
def test_bench_tiny_ratios_come_from_the_same_run(tiny_run):
    out, _ = tiny_run
    s = json.loads((out / "students.json").read_text())["results"]
    for r in s["stacked_vs_loop"]:
        assert r["stacked_students_epochs_per_s"] > 0 and r["loop_students_epochs_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["loop_s"] / r["stacked_s"])
    assert all(c["sample_params_per_s"] > 0 for c in s["cost"]) and s["lm"]["student_iterations_per_s"] > 0
    a = json.loads((out / "actors.json").read_text())["results"]["cluster"]
    assert a["ratio"] == pytest.approx(a["one"]["train_s"] / a["two"]["train_s"])
    assert a["ratio_end_to_end"] == pytest.approx(min(a["one_runs_end_to_end_s"]) / min(a["two_runs_end_to_end_s"]))
    for side in ("one", "two"):
        assert a[side]["seconds"] == pytest.approx(a[side]["start_s"] + a[side]["train_s"])
    assert a["two_actors_on_distinct_nodes"] and a["ray_resources"]["CPU"] == 2
    c = json.loads((out / "cluster.json").read_text())["results"]
    both = [r for r in c["rows"] if "ratio" in r]
    assert both and all(r["ratio"] == pytest.approx(r["scipy"]["time_s"] / r["faiss"]["time_s"]) for r in both)
    assert all(r["identical"] for r in both)
    assert c["fits"]["faiss_d65"]["time"]["slope"] > 0
    rec = json.loads((out / "recovery.json").read_text())["results"]
    assert [r["depth"] for r in rec["width"] + rec["depth"]] == [1, 2]
    assert all(r["seconds"] > 0 for r in rec["width"] + rec["depth"])
    q = json.loads((out / "quality.json").read_text())["results"]
    assert q["rho_sweep"][0]["status"] == "ok" and q["rho_sweep"][0]["layer_sizes"] == [2]


def test_report_shows_the_gpu_clustering_measured_earlier(tmp_path):
    """benchmarks/results/scaling_cluster_gpu.json (torch kNN on a GPU) has its own table in every report."""
    from ecdist.bench import report

    earlier = json.loads((ROOT / "benchmarks" / "results" / "scaling_cluster_gpu.json").read_text())
    text = report.write(tmp_path).read_text()
    assert f"**Clustering on one {earlier['machine']['cuda']}**" in text
    done = [r for r in earlier["rows"] if r.get("gpu", {}).get("status") == "ok"]
    assert done and all(f"| {r['rows']:,} | {r['dim']} | {r['gpu']['total_s']:.1f} |" in text for r in done)


# ----- benchmarks/geodesic_lm.py -------------------------------------------------------------------------------
def test_geodesic_benchmark_quick_run_is_consistent(tmp_path):
    """LM only accepts steps that lower the loss and this benchmark allows no restarts, so a student's
    final loss is below a level exactly when the recorded iteration count for that level is not −1."""
    out = tmp_path / "geo.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "geodesic_lm.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and data["rows"]
    for row in data["rows"]:
        assert row["deep"] == (len(row["student"]) > 3)
        for side in ("plain", "geodesic"):
            r = row[side]
            assert len(r["final"]) == row["students"] and r["s_per_iteration"] > 0
            for level in ("1e-10", "1e-16"):
                reached = [i != -1 for i in r[f"iters_to_{level}"]]
                assert reached == [f < float(level) for f in r["final"]], (side, level, r)
                assert all(0 < i <= data["iterations"] for i in r[f"iters_to_{level}"] if i != -1)


# ----- benchmarks/normal_equations.py --chunks ---------------------------------------------------------
def test_chunk_sweep_quick_run_is_consistent(tmp_path):
    """Every case times every chunk size; each best is its repeats' minimum and each speed-up the ratio of
    two bests of the same run."""
    out = tmp_path / "chunks.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "normal_equations.py"), "--chunks", "--quick",
                    "--students", "2", "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert [r["case"] for r in data["rows"]] and all(r["students"] == 2 and r["queries"] == 200 for r in data["rows"])
    for row in data["rows"]:
        sizes = list(row["seconds"])
        assert sizes == list(row["best_s"]) == list(row["speedup_over_2_18"]) and sizes[0] == str(2**18)
        for ce in sizes:
            assert row["best_s"][ce] == min(row["seconds"][ce]) > 0
            assert row["speedup_over_2_18"][ce] == pytest.approx(row["best_s"][sizes[0]] / row["best_s"][ce], rel=1e-12)
