"""``benchmarks/trained_teachers.py --collect``: one table over the issue's cases from result files
written on different machines and sessions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "trained_teachers.py"


def row(dataset, act, r, recovered, worst, **extra):
    return {"dataset": dataset, "activation": act, "r": r, "recovered": recovered, "worst_1_minus_cos": worst,
            "functional_rel_mse_test": 1e-31, "students_median_rel_mse": 1e-17, "seconds": 1.0} | extra


def collect(tmp_path: Path, *files: dict) -> dict:
    paths = []
    for i, data in enumerate(files):
        paths.append(tmp_path / f"trained_teachers_{'gpu' if i == 0 else f'cpu{i}'}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "table.json"
    subprocess.run([sys.executable, str(SCRIPT), "--collect", *map(str, paths), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


def case(table: dict, dataset: str, act: str, r: list[int]) -> dict:
    (c,) = [c for c in table["cases"] if (c["dataset"], c["activation"], c["r"]) == (dataset, act, r)]
    return c


def test_every_asked_case_is_listed_and_unmeasured_ones_say_so(tmp_path):
    table = collect(tmp_path, {"shallow": [row("digits", "tanh", 8, 8, 1e-16)]})
    asked = [c for c in table["cases"] if c["asked"]]
    assert len(asked) == 2 * 5 * 3 + 2 * 2  # digits and MNIST-1D × 5 activations × r ∈ {8,16,32}; 4 deep
    assert case(table, "digits", "tanh", [8])["verdict"] == "exact"
    assert case(table, "mnist1d", "relu", [32])["verdict"] == "not_measured"
    assert table["summary"]["shallow"] == {"exact": 1, "not_measured": 29}
    assert table["summary"]["deep"] == {"not_measured": 4}


def test_the_current_budget_wins_then_the_newer_file(tmp_path):
    long = {"lm_max_iter": 1500, "stall_window": 300}
    old = {"shallow": [row("digits", "g", 8, 9, 0.8), row("digits", "tanh", 16, 15, 0.5)]}  # default budget
    new = {"shallow": [row("digits", "g", 8, 8, 2e-16, lm_budget=long), row("digits", "tanh", 16, 16, 2e-16)]}
    newer_default = {"shallow": [row("digits", "g", 8, 7, 0.9)]}  # newer, but not the script's g budget
    table = collect(tmp_path, old, new, newer_default)
    g = case(table, "digits", "g", [8])
    assert (g["recovered"], g["verdict"], g["lm_budget"]) == (8, "exact", long)
    assert sorted(x["recovered"] for x in g["superseded"]) == [7, 9]
    t = case(table, "digits", "tanh", [16])
    assert (t["recovered"], t["verdict"], t["source"]) == (16, "exact", "trained_teachers_cpu1.json")


def test_a_later_row_of_the_same_file_and_budget_wins(tmp_path):
    """A case re-run with the same budget (a new reconstruction of the same teacher) is appended
    to the same file: the later row counts, the earlier one is superseded."""
    rows = [row("digits", "relu", 16, 14, 0.6, identifiable_r=15, worst_1_minus_cos_identifiable=0.6),
            row("digits", "relu", 16, 15, 0.7, identifiable_r=15, worst_1_minus_cos_identifiable=2e-16)]
    c = case(collect(tmp_path, {"shallow": rows}), "digits", "relu", [16])
    assert (c["recovered"], c["verdict"]) == (15, "exact_identifiable")
    assert [(x["recovered"], x["verdict"]) for x in c["superseded"]] == [(14, "wrong")]


def test_deep_g_rows_count_with_the_lower_student_tolerance(tmp_path):
    """Deep g students run on to student_tol 1e-28 (DEEP_G_BUDGET); a row stopped at Config's
    1e-16 is superseded by one with the script's budget, while deep tanh keeps DEEP_LM_BUDGET."""
    deep = {"lm_max_iter": 1500, "stall_window": 300}
    rows = [row("digits", "g", [16, 16], [16, 16], 2e-16, lm_budget=deep | {"student_tol": 1e-28}),
            row("digits", "g", [16, 16], [17, 15], 0.1, lm_budget=deep),
            row("digits", "tanh", [16, 16], [16, 16], 2e-16, lm_budget=deep)]
    table = collect(tmp_path, {"deep": rows})
    g = case(table, "digits", "g", [16, 16])
    assert (g["recovered"], g["verdict"], g["current_budget"]) == ([16, 16], "exact", True)
    assert [x["recovered"] for x in g["superseded"]] == [[17, 15]]
    assert case(table, "digits", "tanh", [16, 16])["current_budget"] is True


VERDICTS = [  # one case each: (dataset, activation, r, recovered, worst, extra fields, verdict)
    ("digits", "tanh", 8, 8, 2e-4, {}, "exact"),
    ("digits", "sigmoid", 8, 8, 2e-3, {}, "wrong"),  # the right width with a neuron off by more than 1e-3
    ("digits", "relu", 8, 7, 0.6, {"identifiable_r": 7, "worst_1_minus_cos_identifiable": 1e-16},
     "exact_identifiable"),
    ("digits", "relu", 16, 14, 0.6, {"identifiable_r": 15, "worst_1_minus_cos_identifiable": 0.6}, "wrong"),
    ("digits", "tanh", 32, 33, 1e-16, {}, "within_bound"),  # +3%
    ("digits", "sigmoid", 32, 34, 1e-16, {}, "wrong"),  # +6%
    ("digits", "g", 8, None, None, {}, "not_recovered"),
    ("digits", "tanh", [16, 16], [16, 17], 1e-16, {}, "within_bound"),  # deep: every layer within +1
    ("digits", "g", [16, 16], [16, 18], 1e-16, {}, "wrong"),
    ("mnist1d", "tanh", [12, 12, 12], [11, 12, 12], 1e-16, {}, "wrong"),
]


def test_verdicts(tmp_path):
    shallow = [row(ds, a, r, got, w, **x) for ds, a, r, got, w, x, _ in VERDICTS if not isinstance(r, list)]
    deep = [row(ds, a, r, got, w, **x) for ds, a, r, got, w, x, _ in VERDICTS if isinstance(r, list)]
    table = collect(tmp_path, {"shallow": shallow, "deep": deep})
    got = [case(table, ds, a, r if isinstance(r, list) else [r])["verdict"] for ds, a, r, *_ in VERDICTS]
    assert got == [v[-1] for v in VERDICTS]


def test_not_measured_runs_exactly_the_asked_cases_the_table_lacks(tmp_path):
    """``--not-measured TABLE --list``: the asked cases without a row, shallow r as an int and deep r as
    widths (the forms ``run_one`` takes); measured cases, wrong ones included, and extras are left out."""
    rows = [row("digits", "tanh", 8, 8, 1e-16), row("mnist1d", "g", 32, 30, 0.5), row("digits", "g", 64, 64, 1e-16)]
    deep = [row("digits", "tanh", [16, 16], [16, 16], 1e-16)]
    collect(tmp_path, {"shallow": rows, "deep": deep})
    out = subprocess.run([sys.executable, str(SCRIPT), "--not-measured", str(tmp_path / "table.json"), "--list"],
                         check=True, capture_output=True, text=True, timeout=300)
    todo = {(c["dataset"], json.dumps(c["r"]), c["activation"]) for c in json.loads(out.stdout)}
    asked = {(ds, json.dumps(r), a) for ds in ("digits", "mnist1d") for a in
             ("g", "tanh", "sigmoid", "softplus", "relu") for r in (8, 16, 32)}
    asked |= {(ds, json.dumps(r), a) for ds, r in (("digits", [16, 16]), ("mnist1d", [12, 12, 12])) for a in ("g", "tanh")}
    done = {("digits", "8", "tanh"), ("mnist1d", "32", "g"), ("digits", "[16, 16]", "tanh")}
    assert todo == asked - done and len(todo) == 31


def test_not_measured_refuses_a_file_that_is_not_a_table(tmp_path):
    bad = tmp_path / "rows.json"
    bad.write_text(json.dumps({"shallow": [row("digits", "tanh", 8, 8, 1e-16)]}))  # a result file, not a table
    out = subprocess.run([sys.executable, str(SCRIPT), "--not-measured", str(bad)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and f"{bad} is not a table written by --collect" in out.stderr


def test_a_row_that_records_its_device_says_where_it_ran(tmp_path):
    """Rows name their device (a GPU run's rows may land in a file without "gpu" in its name); older rows
    without one take the file's word."""
    table = collect(tmp_path, {"shallow": [row("digits", "tanh", 8, 8, 1e-16)]},
                    {"shallow": [row("digits", "g", 32, 32, 1e-16, device="cuda:0"), row("digits", "g", 8, 8, 1e-16),
                                 row("mnist1d", "g", 8, 8, 1e-16, device="cpu")]})
    assert case(table, "digits", "tanh", [8])["device"] == "cuda"  # the first file is named ..._gpu.json
    assert case(table, "digits", "g", [32])["device"] == "cuda"
    assert case(table, "digits", "g", [8])["device"] == case(table, "mnist1d", "g", [8])["device"] == "cpu"


def test_students_and_rho_reach_the_config_the_row_and_their_own_run_folder(tmp_path):
    """``--students``/``--rho`` (the authors' deep runs use 50 and 3): the students are that many and
    that wide, the row says so, and their run folder is not the default students' one (no resume mixes them)."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(SCRIPT), "--datasets", "digits", "--widths", "4", "--activations", "tanh",
                    "--skip-plain", "--students", "4", "--rho", "3", "--threads", "1", "--device", "cpu",
                    "--runs", str(tmp_path / "runs"), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=900)
    (r,) = json.loads(out.read_text())["shallow"]
    assert (r["n_students"], r["rho"], r["student_width"], r["r"]) == (4, 3, 12, 4)
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name == "digits-tanh-4-augmented-N4-rho3" and r["run_folder"] == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["n_students"] == 4 and config["student_widths"] == [12]
    # --snapshot: the same case's row from its run folder's students, training nothing and writing nothing there
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    subprocess.run([sys.executable, str(SCRIPT), "--datasets", "digits", "--widths", "4", "--activations", "tanh",
                    "--skip-plain", "--students", "4", "--rho", "3", "--threads", "1", "--device", "cpu",
                    "--runs", str(tmp_path / "runs"), "--snapshot", "--out", str(tmp_path / "snap.json")],
                   check=True, capture_output=True, text=True, timeout=900)
    (snap,) = json.loads((tmp_path / "snap.json").read_text())["shallow"]
    assert snap["snapshot"] and snap["students_steps"] == r["students_steps"] and "snapshot" not in r
    assert snap["recovered"] == r["recovered"] and snap["worst_1_minus_cos"] == r["worst_1_minus_cos"]
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before


def test_not_measured_keeps_the_rows_of_earlier_calls(tmp_path):
    """Its output is one of --collect's sources: a second call with nothing left to run writes nothing, so
    the rows of the first stay counted."""
    rows = [row(ds, a, r, r, 1e-16) for ds in ("digits", "mnist1d") for a in ("g", "tanh", "sigmoid", "softplus", "relu")
            for r in (8, 16, 32)]
    deep = [row(ds, a, r, r, 1e-16) for ds, r in (("digits", [16, 16]), ("mnist1d", [12, 12, 12])) for a in ("g", "tanh")]
    collect(tmp_path, {"shallow": rows, "deep": deep})
    out = tmp_path / "not_measured.json"
    out.write_text(json.dumps({"shallow": [rows[0]], "deep": [deep[0]]}))  # a first call's rows
    done = subprocess.run([sys.executable, str(SCRIPT), "--not-measured", str(tmp_path / "table.json"), "--out", str(out)],
                          check=True, capture_output=True, text=True, timeout=300)
    assert "nothing to run" in done.stdout
    assert json.loads(out.read_text()) == {"shallow": [rows[0]], "deep": [deep[0]]}


def test_a_case_says_which_students_its_row_used(tmp_path):
    table = collect(tmp_path, {"shallow": [row("digits", "tanh", 8, 8, 1e-16)]},
                    {"deep": [row("digits", "g", [16, 16], [16, 16], 1e-16, rho=3, n_students=50)]})
    assert (case(table, "digits", "tanh", [8])["rho"], case(table, "digits", "tanh", [8])["n_students"]) == (2, 10)
    assert (case(table, "digits", "g", [16, 16])["rho"], case(table, "digits", "g", [16, 16])["n_students"]) == (3, 50)


def test_deep_g_teachers_get_their_clustering_settings():
    """Deep g: clusters of 2 of 10 students, fresh students 3r wide above each inserted layer, a longer joint
    fit; every other case keeps Config's. The settings make a valid config for the script's students."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import trained_teachers as tt
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert tt.layer_settings("g", [16, 16]) == {"gamma": 0.2, "finetune_iter": 500, "upper_widths": [48]}
    assert tt.layer_settings("g", [12, 12, 12])["upper_widths"] == [36, 36]
    assert tt.layer_settings("tanh", [16, 16]) == {} == tt.layer_settings("g", [16])
    import ecdist
    config = ecdist.Config(activation="g", student_widths=[24, 24, 24], n_students=10,
                           **tt.layer_settings("g", [12, 12, 12]))
    assert config.upper_widths == [36, 36] and set(tt.layer_settings("g", [8, 8])) <= set(tt.SNAPSHOT_FIELDS)
