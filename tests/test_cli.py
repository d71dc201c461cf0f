"""The ``ecdist`` command, run as a real subprocess (and ``main`` in-process for a few more error paths)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ecdist
from ecdist.cli import angle, main

TINY = ["--gaussian", "500", "--student-widths", "8", "--n-students", "8", "--threads", "1", "--backend", "local"]
ORACLE = '''
import ecdist

_teacher = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)


def query(X):
    return _teacher.predict(X)[:, 0]  # numpy in, 1-D numpy out: a black box


def broken(X):
    raise RuntimeError("oracle is down")
'''


def cli(*args, cwd=None, pythonpath=None, script=False):
    """Run ``ecdist ARGS`` in a fresh interpreter; returns the CompletedProcess."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["COLUMNS"] = "160"
    cmd = [str(Path(sys.executable).parent / "ecdist")] if script else [sys.executable, "-m", "ecdist.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_user_error(proc, *fragments):
    """Exit status 2, one line on stderr that starts with 'ecdist: error:', no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ecdist: error:"), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A teacher saved as a state dict, and an importable black-box module."""
    root = tmp_path_factory.mktemp("cli")
    t = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
    torch.save(t.state_dict(), root / "teacher.pt")
    (root / "mods").mkdir()
    (root / "mods" / "ec_oracle.py").write_text(ORACLE)
    return root


@pytest.fixture(scope="module")
def recovered(files):
    """``ecdist recover`` on the saved teacher; returns (process, output folder)."""
    out = files / "run1"
    proc = cli("recover", "--teacher", files / "teacher.pt", "--arch", "10-2-1", "--activation", "tanh",
               *TINY, "--beta", "pi/3", "--out", out)
    return proc, out


# ----- help ------------------------------------------------------------------------------------------------
# Every subprocess pays torch's import (seconds on the shared test machine): the installed console
# script runs once for real; the other help texts come from ``main`` in-process (the same parser).
def test_console_script_recover_help():
    proc = cli("recover", "--help", script=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ecdist recover")
    # every Config field is a flag of `recover` (activation and student_widths have their own)
    for f in dataclasses.fields(ecdist.Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in proc.stdout, flag
    assert "--no-prune" in proc.stdout and "--resume" in proc.stdout and "--d-in" in proc.stdout


@pytest.mark.parametrize("command", [[], ["demo"], ["compare"]], ids=["root", "demo", "compare"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ecdist" + "".join(" " + c for c in command))
    expected = {"root": ["demo", "recover", "compare"], "demo": ["--n-students", "--out"],
                "compare": ["--teacher", "--arch", "--queries"]}["-".join(command) or "root"]
    for word in expected:
        assert word in out, word




# ----- recover and compare --------------------------------------------------------------------------------
def test_recover_writes_the_result_folder(recovered):
    proc, out = recovered
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("report.json", "network.safetensors", "recovery.png", "config.json", "run.json",
                 "students.parquet", "layer_1_neurons.parquet", "checkpoints/pack_0000.npz"):
        assert (out / name).is_file(), name
    assert (out / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recovered hidden widths: [2]" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["layer_sizes"] == [2]
    assert report["comparison"]["teacher_sizes"] == [2]  # a state-dict teacher is compared by weights
    assert max(report["comparison"]["max_weight_distance"]) < 1e-6
    config = ecdist.Config.from_json((out / "config.json").read_text())
    assert config.beta == math.pi / 3  # --beta pi/3 parsed
    assert config.student_widths == [8] and config.n_students == 8 and config.activation == "tanh"


def test_recovered_network_matches_the_teacher(recovered):
    proc, out = recovered
    assert proc.returncode == 0, proc.stderr
    result = ecdist.load(out)
    t = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
    X = ecdist.queries.gaussian(1000, 10, seed=7)
    rep = ecdist.compare(result.network, t, "tanh", X=X)
    assert result.layer_sizes == [2] and rep.max_weight_distance[0] < 1e-6 and rep.functional_mse < 1e-12


def test_compare_prints_the_table(recovered, files):
    proc, out = recovered
    assert proc.returncode == 0, proc.stderr
    cmp_ = cli("compare", out, "--teacher", files / "teacher.pt", "--arch", "10-2-1")
    assert cmp_.returncode == 0, cmp_.stderr
    lines = cmp_.stdout.splitlines()
    assert lines[0].split() == ["layer", "teacher", "recovered", "overhead", "worst", "1-|cos|", "median"]
    row = lines[1].split()
    assert row[:4] == ["1", "2", "2", "+0%"]
    assert float(row[4]) < 1e-6
    m = re.search(r"functional relative MSE on 2000 fresh inputs: (\S+)", cmp_.stdout)
    assert m and float(m.group(1)) < 1e-12


def test_resume(recovered, tmp_path, files, capsys):
    proc, out = recovered
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    ck = folder / "checkpoints" / "pack_0000.npz"
    mtime = ck.stat().st_mtime_ns
    rc, stdout, err = _run_main(["recover", "--teacher", files / "teacher.pt", "--arch", "10-2-1",
                                 "--activation", "tanh", *TINY, "--beta", "pi/3", "--out", folder, "--resume"], capsys)
    assert rc == 0, err
    assert "recovered hidden widths: [2]" in stdout
    assert ck.stat().st_mtime_ns == mtime  # the finished pack was reused, not retrained
    assert ecdist.load(folder).layer_sizes == [2]


def test_snapshot_of_a_run_in_progress(recovered, tmp_path, capsys):
    """`--resume RUN --snapshot DIR`: the students as checkpointed, clustered in DIR, a run of its own that the
    same command again resumes; RUN keeps every byte."""
    proc, out = recovered
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    (folder / "report.json").unlink()  # killed before the result was written
    (folder / "checkpoints" / ".pack_0000.npz.in-flight.tmp").write_bytes(b"a write of the training run")
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    rc, stdout, err = _run_main(["recover", "--resume", folder, "--snapshot", tmp_path / "snap"], capsys)
    assert rc == 0, err
    assert "recovered hidden widths: [2]" in stdout and f"from the checkpoints of {folder}/ as they stand" in stdout
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before
    snap = ecdist.load(tmp_path / "snap")
    assert snap.layer_sizes == [2] and (tmp_path / "snap" / "recovery.png").is_file()
    assert json.loads((tmp_path / "snap" / "run.json").read_text())["snapshot_of"]["run"] == str(folder.resolve())
    kept = {p: p.read_bytes() for p in sorted((tmp_path / "snap").rglob("*")) if p.is_file() and p.suffix != ".png"}
    rc, stdout, err = _run_main(["recover", "--resume", folder, "--snapshot", tmp_path / "snap"], capsys)
    assert rc == 0 and "recovered hidden widths: [2]" in stdout, err  # the finished look, as stored
    assert {p: p.read_bytes() for p in sorted((tmp_path / "snap").rglob("*")) if p.is_file() and p.suffix != ".png"} == kept
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for snap, says in ((folder, "outside RUN_DIR"), (folder / "now", "outside RUN_DIR"),
                       (tmp_path / "foreign", "not an ecdist run folder"), (out, "not a look at")):
        rc, _, err = _run_main(["recover", "--resume", folder, "--snapshot", snap], capsys)
        assert rc == 2 and says in err, (snap, err)
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before
    # other clustering settings: clustered with them; settings that shape the students: refused
    rc, _, err = _run_main(["recover", "--resume", folder, "--snapshot", tmp_path / "g75", "--gamma", "0.75",
                            "--cluster-rule", "reference"], capsys)
    assert rc == 0, err
    looked = ecdist.load(tmp_path / "g75")
    assert (looked.config.gamma, looked.config.cluster_rule) == (0.75, "reference")
    rc, _, err = _run_main(["recover", "--resume", folder, "--snapshot", tmp_path / "s1", "--seed", "1"], capsys)
    assert rc == 2 and "seed=0 there, 1 here" in err and "may change gamma" in err
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before


def test_rerun_without_resume_is_refused(recovered, files, capsys):
    proc, out = recovered
    assert proc.returncode == 0, proc.stderr
    before = sorted(p.name for p in out.iterdir())
    rc, _, err = _run_main(["recover", "--teacher", files / "teacher.pt", "--arch", "10-2-1", "--activation", "tanh",
                            *TINY, "--out", out], capsys)
    assert rc == 2 and err.startswith("ecdist: error:") and err.count("\n") == 1
    assert "already holds an ecdist run" in err and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_black_box_teacher(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bb"
    proc = cli("recover", "--teacher", "ec_oracle:query", "--d-in", "10", "--activation", "tanh", *TINY,
               "--out", out, pythonpath=files / "mods")
    assert proc.returncode == 0, proc.stderr
    assert "recovered hidden widths: [2]" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["layer_sizes"] == [2] and report["comparison"] is None  # a black box has no weights
    assert (out / "recovery.png").is_file()
    t = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
    rep = ecdist.compare(ecdist.load(out).network, t, "tanh", X=ecdist.queries.gaussian(1000, 10, seed=7))
    assert rep.max_weight_distance[0] < 1e-6
    monkeypatch.syspath_prepend(str(files / "mods"))
    rc, stdout, err = _run_main(["compare", out, "--teacher", "ec_oracle:query"], capsys)
    assert rc == 0, err
    assert stdout.splitlines()[1].split() == ["1", "?", "2"]
    m = re.search(r"functional relative MSE on 2000 fresh inputs: (\S+)", stdout)
    assert m and float(m.group(1)) < 1e-12


# ----- errors ---------------------------------------------------------------------------------------------
SAVED = ["--teacher", "{dir}/teacher.pt", "--arch", "10-2-1"]
ERRORS = {  # case: (arguments, fragments the error line must contain)
    "unknown activation": ([*SAVED, "--activation", "swish"], ["activation", "swish"]),
    "gamma too small": ([*SAVED, "--activation", "tanh", "--gamma", "0.05"], ["gamma"]),
    "missing teacher file": (["--teacher", "{dir}/absent.pt", "--arch", "10-2-1", "--activation", "tanh"],
                             ["absent.pt", "does not exist"]),
    "teacher without arch": (["--teacher", "{dir}/teacher.pt", "--activation", "tanh"], ["--arch"]),
    "black box raises": (["--teacher", "ec_oracle:broken", "--d-in", "10", "--activation", "tanh", "--teacher-retries", "0"],
                         ["RuntimeError", "oracle is down", "0..499"]),
}
IN_SUBPROCESS = {"unknown activation", "black box raises"}  # before and after the progress display starts


@pytest.mark.parametrize("case", sorted(IN_SUBPROCESS))
def test_user_errors_exit_2_with_one_line(files, tmp_path, case):
    args, fragments = ERRORS[case]
    args = [a.replace("{dir}", str(files)) for a in args]
    proc = cli("recover", *args, *TINY, "--out", tmp_path / "out", pythonpath=files / "mods")
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing was trained


@pytest.mark.parametrize("case", sorted(set(ERRORS) - {"black box raises"}))  # that one leaves rich's display running
def test_user_errors_in_process(files, tmp_path, capsys, monkeypatch, case):
    """The same cases through ``main``: a traceback would surface here as an exception."""
    monkeypatch.syspath_prepend(str(files / "mods"))
    args, fragments = ERRORS[case]
    args = [a.replace("{dir}", str(files)) for a in args]
    rc, _, err = _run_main(["recover", *args, *TINY, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert err.startswith("ecdist: error:") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, (f, err)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_beta_pi_over_zero_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["recover", "--teacher", "t.pt", "--activation", "tanh", "--gaussian", "5", "--out", "o",
              "--student-widths", "8", "--beta", "pi/0"])
    assert info.value.code == 2


def _run_main(argv, capsys):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["recover", *SAVED, "--activation", "tanh", "--gaussian", "50"], "student_widths"),
        (["recover", "--teacher", "ec_oracle:query", "--activation", "tanh", "--uniform", "50",
          "--student-widths", "8"], "d_in"),
        (["recover", "--teacher", "no_such_mod_ec:f", "--activation", "tanh", "--gaussian", "50", "--d-in", "3",
          "--student-widths", "8"], "could not be imported"),
        (["recover", "--teacher", "{dir}/teacher.pt", "--arch", "10-2-1", "--activation", "tanh", "--queries",
          "{dir}/absent.npy", "--student-widths", "8"], "absent.npy"),
        (["compare", "{dir}/no-such-result", "--teacher", "{dir}/teacher.pt", "--arch", "10-2-1"], "does not exist"),
    ],
    ids=["no student widths", "no d_in", "unimportable black box", "missing query file", "missing result"],
)
def test_more_user_errors_in_process(files, tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.syspath_prepend(str(files / "mods"))
    argv = [a.replace("{dir}", str(files)) for a in argv] + ["--out", tmp_path / "o"] * (argv[0] == "recover")
    rc, out, err = _run_main(argv, capsys)
    assert rc == 2
    assert err.startswith("ecdist: error:") and err.count("\n") == 1 and fragment in err, err


def test_queries_from_a_file(files, tmp_path, capsys):
    X = ecdist.queries.gaussian(500, 10, seed=4)
    ecdist.queries.save(X, tmp_path / "X.parquet")
    rc, out, err = _run_main(["recover", "--teacher", files / "teacher.pt", "--arch", "10-2-1", "--activation", "tanh",
                              "--queries", tmp_path / "X.parquet", "--student-widths", "8", "--n-students", "8",
                              "--threads", "1", "--no-prune", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    result = ecdist.load(tmp_path / "o")
    assert result.config.prune is False  # --no-prune reached the Config: every candidate cluster is kept
    assert result.layer_sizes == [result.layers[0].clusters.num_rows] and result.layer_sizes[0] >= 2
    # the recovery used exactly these queries: recluster accepts them (and prunes to the teacher's width)
    t = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
    assert ecdist.recluster(result, t, X, prune=True).layer_sizes == [2]
    with pytest.raises(ecdist.QueryError):
        ecdist.recluster(result, t, ecdist.queries.gaussian(500, 10, seed=1))


# ----- the angle parser ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,value",
    [("pi/3", math.pi / 3), ("π/3", math.pi / 3), ("PI/2", math.pi / 2), ("pi", math.pi), ("0.25*pi", math.pi / 4),
     ("0.5pi", math.pi / 2), ("2*pi/3", 2 * math.pi / 3), (" pi / 6 ", math.pi / 6), ("1.047", 1.047), ("0.3", 0.3),
     ("1e-2", 0.01), (".5", 0.5)],
)
def test_angle(text, value):
    assert angle(text) == pytest.approx(value, rel=1e-15)


@pytest.mark.parametrize("text", ["abc", "pi/", "3pi/x", "pi pi", "", "/3"])
def test_angle_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not an angle"):
        angle(text)


def test_angle_rejects_division_by_zero():
    with pytest.raises(argparse.ArgumentTypeError):
        angle("pi/0")


def test_beta_flag_reaches_the_config():
    from ecdist.cli import _config, build_parser

    args = build_parser().parse_args(["recover", "--teacher", "t.pt", "--activation", "tanh", "--gaussian", "5",
                                      "--out", "o", "--student-widths", "8", "--beta", "pi/6", "--gamma", "0.75"])
    config = _config(args, activation=args.activation)
    assert config.beta == math.pi / 6 and config.gamma == 0.75 and config.student_widths == [8]
    assert config.n_students == ecdist.Config(activation="tanh", student_widths=[8]).n_students  # default kept


def test_a_bad_angle_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["recover", "--teacher", "x", "--activation", "tanh", "--gaussian", "5", "--out", "o", "--beta", "steep"])
    assert info.value.code == 2
    assert "not an angle" in capsys.readouterr().err
