"""Durability of run folders: a driver killed with SIGKILL at any point resumes to the same result.

Kill points are events, never timers: the driver (a real subprocess) sends itself SIGKILL from
its progress callback when a given event arrives, or the test SIGKILLs it once a given file is
listed in the run folder's manifest. Every resumed result is compared bit for bit with an
uninterrupted run of the same seed, and the resume is shown not to redo what was finished.
Damage (truncated or bit-flipped files, foreign folders, crafted manifests) is detected by
checksum and either recomputed (checkpoints) or refused with a RunFolderError (everything else).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ecdist
from ecdist import RunFolderError
from ecdist.cli import main
from ecdist.storage import Files

ROOT = Path(__file__).resolve().parent.parent
DRIVER = """
import json, os, signal, sys
import ecdist

spec = json.loads(sys.argv[1])
kill = spec.get("kill") or {}

def progress(event, info):
    # SIGKILL: no exception, no atexit, no flush; exactly what a lost node or the OOM killer does
    if event == kill.get("event") and all(info.get(k) == v for k, v in kill.get("match", {}).items()):
        os.kill(os.getpid(), signal.SIGKILL)

teacher = ecdist.teachers.random_mlp(spec["arch"], "tanh", seed=0)
X = ecdist.queries.gaussian(spec["n"], spec["arch"][0], seed=1)
ecdist.recover(teacher, X, ecdist.Config(**spec["config"]), out=spec["out"], progress=progress)
"""
# lm_max_iter 40: every pack trains 40 steps (checkpoints at 10, 20, …); two packs of two students
BASE = dict(activation="tanh", n_students=4, seed=0, threads=1, backend="local", pack_size=2, lm_max_iter=40)
ONE = {"arch": [4, 2, 1], "n": 300, "config": BASE | {"student_widths": [6]}}
DEEP = {"arch": [5, 3, 2, 1], "n": 300, "config": BASE | {"student_widths": [8, 6]}}


def inputs(spec):
    teacher = ecdist.teachers.random_mlp(spec["arch"], "tanh", seed=0)
    return teacher, ecdist.queries.gaussian(spec["n"], spec["arch"][0], seed=1), ecdist.Config(**spec["config"])


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def drive(spec, out: Path, event: str | None = None, **match) -> None:
    """Run the driver; with ``event``, it must die by SIGKILL at that event (with these fields)."""
    kill = {"event": event, "match": match} if event else None
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec | {"out": str(out), "kill": kill})],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == (-signal.SIGKILL if event else 0), proc.stderr[-2000:]


def record(events: list):
    return lambda event, info: events.append((event, info))


def steps(events, **match) -> list[int]:
    """The training steps reported (by packs/layers matching ``match``)."""
    return [i["step"] for e, i in events
            if e == "train" and "step" in i and all(i.get(k, 1) == v for k, v in match.items())]


def assert_same(a, b) -> None:
    """The same recovery, bit for bit: layer sizes, weights, students."""
    assert a.layer_sizes == b.layer_sizes
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.students.equals(b.students)
    for la, lb in zip(a.layers, b.layers):
        assert la.neurons.equals(lb.neurons) and la.clusters.equals(lb.clusters)


def checkpoint(folder: Path, rel: str) -> dict[str, np.ndarray]:
    with np.load(folder / rel, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Uninterrupted runs (one and two hidden layers) and their finished folders: the references."""
    root = tmp_path_factory.mktemp("clean")
    out = {}
    for name, spec in (("one", ONE), ("deep", DEEP)):
        teacher, X, config = inputs(spec)
        out[name] = (root / name, ecdist.recover(teacher, X, config, out=root / name))
    return out


def unfinished(clean, tmp_path, name="one") -> Path:
    """A copy of a clean run folder as a kill just before it wrote its result leaves it."""
    folder = tmp_path / name
    shutil.copytree(clean[name][0], folder)
    Files(folder).remove("report.json")
    return folder


# ----- SIGKILL at every stage, resume, the same result ----------------------------------------------------
def test_killed_while_training_resumes_where_it_stopped(clean, tmp_path):
    folder = tmp_path / "run"
    drive(ONE, folder, "train", pack=1, step=13)  # pack 0 finished, pack 1 at step 13
    assert not (folder / "report.json").exists()
    assert bool(checkpoint(folder, "checkpoints/pack_0000.npz")["done"])
    assert int(checkpoint(folder, "checkpoints/pack_0001.npz")["steps"]) == 10  # its last periodic checkpoint

    events = []
    result = ecdist.recover(None, None, None, out=folder, resume=True, progress=record(events))  # all from the folder
    assert steps(events, pack=0) == []  # the finished pack is not trained again
    assert steps(events, pack=1) == list(range(11, 41))  # the other picks up after its checkpoint
    assert result.plan["packs_resumed_from"] == [40, 10]
    assert_same(result, clean["one"][1])
    assert_same(ecdist.load(folder), clean["one"][1])


# kill event → (layer stage on disk at the kill, stages the resume reads back, whether it clusters again)
ONE_LAYER_KILLS = {
    "clustering": (("cluster", {}), False, [], True),  # clustered, not yet saved: clustered again
    "fitting": (("reconstruct", {}), True, [1], False),  # clustering and fit saved, result not yet written
}


@pytest.mark.parametrize("point", list(ONE_LAYER_KILLS))
def test_killed_after_training_does_not_train_again(clean, tmp_path, point):
    (event, match), staged, layers_resumed, clusters_again = ONE_LAYER_KILLS[point]
    folder = tmp_path / "run"
    drive(ONE, folder, event, **match)
    assert (folder / "checkpoints/layer_1.npz").exists() == staged
    assert not (folder / "report.json").exists()
    teacher, X, config = inputs(ONE)
    events = []
    result = ecdist.recover(teacher, X, config, out=folder, resume=True, progress=record(events))
    assert steps(events) == [] and result.plan["packs_resumed_from"] == [40, 40]
    assert result.plan["layers_resumed"] == layers_resumed
    assert any(e == "cluster" for e, _ in events) == clusters_again
    assert_same(result, clean["one"][1])


def test_killed_after_finishing_returns_the_stored_result_from_the_cli(clean, tmp_path, capsys):
    """`ecdist recover --resume RUN_DIR`, nothing else given: teacher answers, queries and config come from the folder."""
    folder = tmp_path / "run"
    drive(ONE, folder, "done")  # killed after the result was written, before recover returned
    listed = (folder / "manifest.json").read_bytes()
    assert main(["recover", "--resume", str(folder)]) == 0  # in-process: the same parser and command
    stdout = capsys.readouterr().out
    assert "resumed: the finished run's result read from the run folder" in stdout
    assert "recovered hidden widths: [" in stdout
    assert (folder / "manifest.json").read_bytes() == listed  # nothing recomputed, nothing rewritten
    assert_same(ecdist.load(folder), clean["one"][1])


# two hidden layers: layer 1 is clustered, inserted into every pack, the packs fine-tuned, then layer 2
DEEP_KILLS = {
    "fine-tuning": (("train", {"layer": 2, "pack": 0, "step": 13}), [11], list(range(1, 41))),
    "between layers": (("train", {"layer": 2, "pack": 1, "phase": "done"}), [], []),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(DEEP_KILLS))
def test_deep_run_killed_between_layers_keeps_layer_1(clean, tmp_path, point):
    (event, match), pack0_from, pack1_steps = DEEP_KILLS[point]
    folder = tmp_path / "run"
    drive(DEEP, folder, event, **match)
    assert (folder / "checkpoints/layer_1.npz").exists() and not (folder / "checkpoints/layer_2.npz").exists()
    events = []
    result = ecdist.recover(None, None, None, out=folder, resume=True, progress=record(events))
    assert steps(events, layer=1) == []  # the students' training is not redone
    assert [e for e, i in events if e == "cluster" and i["layer"] == 1] == []  # nor layer 1's clustering
    assert result.plan["layers_resumed"] == [1]
    assert steps(events, layer=2, pack=0)[:1] == pack0_from  # a fine-tune picks up after its checkpoint
    assert steps(events, layer=2, pack=1) == pack1_steps
    assert_same(result, clean["deep"][1])


def _session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (one this test started), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_ray_driver_killed_when_a_checkpoint_appears(clean, tmp_path):
    """A driver training on its own local Ray is SIGKILLed as soon as the manifest lists a pack's
    checkpoint; the run, resumed in-process, ends with the uninterrupted run's network."""
    folder = tmp_path / "run"
    spec = ONE | {"config": ONE["config"] | {"backend": "ray"}, "out": str(folder)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if "checkpoints/pack_0000.npz" in (Files(folder).entries() or {}):
                    break
            except RunFolderError:  # not yet written
                pass
            time.sleep(0.02)  # polling the folder, not waiting for a race
        assert proc.poll() is None, "the driver finished before a checkpoint was listed"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:  # the local Ray the driver started dies with its session: end what is left of it
        for _ in range(100):
            left = [p for p in _session_pids(proc.pid) if p != os.getpid()]
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
    assert not (folder / "report.json").exists()
    at_kill = int(checkpoint(folder, "checkpoints/pack_0000.npz")["steps"])
    result = ecdist.recover(None, None, ecdist.Config(**ONE["config"]), out=folder, resume=True)  # in-process now
    assert result.plan["packs_resumed_from"][0] >= at_kill >= 10  # what was trained before the kill was kept
    assert_same(result, clean["one"][1])


# ----- damage is detected by checksum: checkpoints recomputed, the rest refused ----------------------------
@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_pack_checkpoint_is_reported_and_retrained(clean, tmp_path, caplog, damage):
    folder = unfinished(clean, tmp_path)
    ck = folder / "checkpoints/pack_0001.npz"
    if damage == "truncated":
        ck.write_bytes(ck.read_bytes()[:-100])
    else:
        flip_a_bit(ck)
    events = []
    with caplog.at_level(logging.WARNING, logger="ecdist.storage"):
        result = ecdist.recover(None, None, None, out=folder, resume=True, progress=record(events))
    assert [r.getMessage() for r in caplog.records if "pack_0001.npz fails its checksum" in r.getMessage()]
    assert steps(events, pack=0) == [] and steps(events, pack=1) == list(range(1, 41))  # retrained, never loaded
    assert_same(result, clean["one"][1])
    Files(folder).read("checkpoints/pack_0001.npz")  # a whole, listed checkpoint again


def test_a_damaged_layer_checkpoint_is_clustered_again(clean, tmp_path, caplog):
    folder = unfinished(clean, tmp_path)
    flip_a_bit(folder / "checkpoints/layer_1.npz")
    events = []
    with caplog.at_level(logging.WARNING, logger="ecdist.storage"):
        result = ecdist.recover(None, None, None, out=folder, resume=True, progress=record(events))
    assert any("layer_1.npz fails its checksum" in r.getMessage() for r in caplog.records)
    assert any(e == "cluster" for e, _ in events) and result.plan["layers_resumed"] == []
    assert_same(result, clean["one"][1])


def test_listed_files_that_lack_their_contents_are_not_trusted(clean, tmp_path, caplog):
    """Checksums pass (the manifest was updated), but a layer checkpoint lacks its fit and a report a field."""
    folder = unfinished(clean, tmp_path)
    stage = checkpoint(folder, "checkpoints/layer_1.npz")
    ecdist.storage.RunFolder(folder).save_stage(1, {k: v for k, v in stage.items() if not k.startswith("fit.")})
    events = []
    with caplog.at_level(logging.WARNING, logger="ecdist.pipeline"):
        result = ecdist.recover(None, None, None, out=folder, resume=True, progress=record(events))
    assert any("layer 1" in r.getMessage() and "lacks" in r.getMessage() for r in caplog.records)
    assert any(e == "cluster" for e, _ in events) and result.plan["layers_resumed"] == []
    assert_same(result, clean["one"][1])
    report = json.loads((folder / "report.json").read_text())
    del report["layer_sizes"]
    Files(folder).write("report.json", json.dumps(report).encode())
    with pytest.raises(RunFolderError, match="report.json lacks or garbles a field"):
        ecdist.load(folder)


def test_a_damaged_final_result_is_refused_and_can_be_rebuilt(clean, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(clean["one"][0], folder)
    flip_a_bit(folder / "network.safetensors")
    with pytest.raises(RunFolderError, match="network.safetensors fails its checksum") as info:
        ecdist.recover(None, None, None, out=folder, resume=True)
    assert "delete" in str(info.value) and "report.json" in str(info.value)  # says what to do
    with pytest.raises(RunFolderError, match="network.safetensors"):
        ecdist.load(folder)
    (folder / "report.json").unlink()  # as the message says
    assert_same(ecdist.recover(None, None, None, out=folder, resume=True), clean["one"][1])
    assert_same(ecdist.load(folder), clean["one"][1])


def test_damaged_queries_are_asked_again_only_with_the_teacher(clean, tmp_path):
    folder = unfinished(clean, tmp_path)
    flip_a_bit(folder / "answers.npy")
    with pytest.raises(RunFolderError, match="answers.npy fails its checksum.*give the teacher and the queries"):
        ecdist.recover(None, None, None, out=folder, resume=True)
    teacher, X, config = inputs(ONE)
    assert_same(ecdist.recover(teacher, X, config, out=folder, resume=True), clean["one"][1])
    Files(folder).read("answers.npy")  # rewritten whole


# ----- the folder must be this run's, and a run folder ------------------------------------------------------
def test_resume_checks_what_is_given_again(clean, tmp_path):
    folder = unfinished(clean, tmp_path)
    teacher, X, config = inputs(ONE)
    other = ecdist.teachers.random_mlp(ONE["arch"], "tanh", seed=5)
    with pytest.raises(RunFolderError, match="another teacher.*weights"):
        ecdist.recover(other, None, None, out=folder, resume=True)
    with pytest.raises(RunFolderError, match="another teacher.*answers on the first 64"):
        ecdist.recover(lambda x: other.predict(x), None, None, out=folder, resume=True)
    with pytest.raises(RunFolderError, match="queries differ"):
        ecdist.recover(None, X[::-1], None, out=folder, resume=True)
    with pytest.raises(RunFolderError, match="config differ"):
        ecdist.recover(None, None, config.replace(seed=1), out=folder, resume=True)
    # the same teacher as a black box passes its spot check; where the run executes may change
    result = ecdist.recover(lambda x: teacher.predict(x), X, config.replace(actor_restarts=5), out=folder, resume=True)
    assert_same(result, clean["one"][1])


def test_a_foreign_folder_or_a_broken_manifest_is_refused(clean, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="not an ecdist run folder.*nothing to resume"):
        ecdist.recover(None, None, None, out=foreign, resume=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]

    folder = unfinished(clean, tmp_path)
    (folder / "manifest.json").write_text('{"schema": 1, "files": {"run.json": ')
    with pytest.raises(RunFolderError, match="manifest.json is corrupt"):
        ecdist.recover(None, None, None, out=folder, resume=True)
    (folder / "manifest.json").unlink()
    with pytest.raises(RunFolderError, match="has no manifest.json"):
        ecdist.recover(None, None, None, out=folder, resume=True)


def test_nothing_to_resume_without_a_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(ecdist.TeacherError, match="no teacher was given.*no run in"):
        ecdist.recover(None, inputs(ONE)[1], ecdist.Config(**ONE["config"]), out=tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("path", ["../outside.npz", "/etc/hostname", "checkpoints/../../x", ""])
def test_a_manifest_path_leaving_the_folder_is_refused(clean, tmp_path, path):
    folder = unfinished(clean, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][path] = {"sha256": "0" * 64, "size": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match="not a plain path inside the folder"):
        ecdist.recover(None, None, None, out=folder, resume=True)
    with pytest.raises(RunFolderError, match="not a plain path inside the folder"):
        ecdist.load(folder)


def test_a_symlink_leading_out_of_the_folder_is_refused(clean, tmp_path):
    folder = unfinished(clean, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder / "checkpoints", elsewhere)
    (folder / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(RunFolderError, match="leads outside the folder through a symbolic link"):
        ecdist.recover(None, None, None, out=folder, resume=True)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    with pytest.raises(RunFolderError, match="symbolic link"):  # nor is anything written through it
        ecdist.storage.RunFolder(folder).save_pack(0, {"x": np.zeros(1)})
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before


def test_cli_resume_errors_are_one_line_and_exit_2(clean, tmp_path, capsys):
    folder = unfinished(clean, tmp_path)
    torch.save(ecdist.teachers.random_mlp(ONE["arch"], "tanh", seed=5).state_dict(), tmp_path / "other.pt")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "run.json").write_text("\x00\x01 not json")
    cases = {
        "another teacher": (["--resume", folder, "--teacher", tmp_path / "other.pt", "--arch", "4-2-1"], "another teacher"),
        "garbage folder": (["--resume", tmp_path / "garbage"], "no manifest.json"),
        "two folders": (["--resume", folder, "--out", tmp_path / "x"], "name different folders"),
        "nothing there": (["--resume", tmp_path / "empty"], "no run in that folder"),
    }
    for name, (argv, fragment) in cases.items():
        rc = main(["recover", *map(str, argv)])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert err.startswith("ecdist: error:") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert fragment in err, (name, err)


def test_a_corrupt_manifest_on_cli_resume_exits_2_without_traceback(clean, tmp_path):
    folder = unfinished(clean, tmp_path)
    (folder / "manifest.json").write_bytes(b"\xff\xfe garbage")
    proc = subprocess.run([sys.executable, "-m", "ecdist.cli", "recover", "--resume", str(folder)],
                          capture_output=True, text=True, env=env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("ecdist: error:") and "manifest.json is corrupt" in proc.stderr


# ----- the manifest under concurrent writers (pack actors write their checkpoints at once) -----------------
def _write_many(root: str, tag: int) -> None:
    files = Files(root)
    for i in range(10):
        files.write(f"checkpoints/{tag}_{i}.bin", os.urandom(64 + i))


def test_concurrent_writers_lose_no_manifest_entry(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), t)) for t in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    files = Files(tmp_path)
    listed = files.entries()
    assert len(listed) == 40
    for rel in listed:
        files.read(rel)  # every entry is the file's checksum
