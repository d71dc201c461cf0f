"""Result folders (Recovery.save / ecdist.load), run folders (out=, resume=) and recluster."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import ecdist
from ecdist import ConfigError, QueryError, RunFolderError, storage
from ecdist.pipeline import RECLUSTER_FIELDS, SNAPSHOT_FIELDS
from ecdist.queries import Standardizer
from ecdist.students import StudentPack

RESULT_FILES = [
    "config.json", "report.json", "network.json", "network.safetensors", "students.parquet",
    "history.parquet", "layer_1_neurons.parquet", "layer_1_clusters.parquet",
]


def teacher():
    return ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)


def queries():
    return ecdist.queries.gaussian(500, 10, seed=1)


def config(**changes):
    # threads=1: the test machine's two cores are shared; one thread is also fastest at this size
    return ecdist.Config(activation="tanh", student_widths=[8], n_students=8, seed=0, threads=1, backend="local").replace(**changes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished run folder and its result (reused read-only; tests that change a folder copy it)."""
    folder = tmp_path_factory.mktemp("storage") / "run"
    result = ecdist.recover(teacher(), queries(), config(), out=folder)
    return folder, result


def copy_run(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run[0], dst)
    return dst


def state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_network(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def record(events: list):
    """A progress callback that keeps every (event, info) it is given."""
    return lambda event, info: events.append((event, info))


def checkpoint(folder: Path) -> Path:
    return folder / "checkpoints" / "pack_0000.npz"


# ----- the recovery itself (a sanity check that the fixture is a real result) --------------------------
def test_fixture_run_recovered_the_teacher(run):
    _, result = run
    assert result.layer_sizes == [2]
    rep = ecdist.compare(result.network, teacher(), "tanh", X=ecdist.queries.gaussian(1000, 10, seed=2))
    assert rep.max_weight_distance[0] < 1e-6


# ----- result folders ------------------------------------------------------------------------------------
def test_save_and_load_round_trip(run, tmp_path):
    _, result = run
    X_test = ecdist.queries.gaussian(800, 10, seed=3)
    with_cmp = dataclasses.replace(result)
    with_cmp.comparison = ecdist.compare(with_cmp.network, teacher(), "tanh", X=X_test)
    out = with_cmp.save(tmp_path / "res")
    assert Path(out) == tmp_path / "res"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([*RESULT_FILES, "manifest.json"])
    assert sorted(json.loads((out / "manifest.json").read_text())["files"]) == sorted(RESULT_FILES)

    back = ecdist.load(tmp_path / "res")
    assert isinstance(back, ecdist.Recovery)
    assert back.layer_sizes == result.layer_sizes == [2]
    assert back.config == result.config
    assert back.final_rel_mse == result.final_rel_mse
    assert back.plan == result.plan
    assert back.timings == result.timings
    assert_same_network(back.network, result.network)
    np.testing.assert_array_equal(back.network.predict(X_test), result.network.predict(X_test))
    assert back.network.widths == result.network.widths and back.network.activation == "tanh"
    assert back.students.equals(result.students)
    assert back.students.column_names == ["student", "pack", "rel_loss", "status", "restarts", "steps"]
    np.testing.assert_array_equal(back.history, result.history)
    np.testing.assert_array_equal(back.history_steps, result.history_steps)
    assert back.history.shape == (len(result.history_steps), 8)
    assert len(back.layers) == 1 and back.layers[0].width == 2 and back.layers[0].index == 1
    assert back.layers[0].neurons.equals(result.layers[0].neurons)
    assert back.layers[0].clusters.equals(result.layers[0].clusters)
    assert back.comparison == with_cmp.comparison
    assert back.comparison.max_weight_distance[0] < 1e-6 and back.comparison.teacher_sizes == [2]


def test_saved_files_are_plain_json_and_parquet(run, tmp_path):
    _, result = run
    out = result.save(tmp_path / "res")
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 1 and report["layer_sizes"] == [2]
    assert report["comparison"] is None  # none was computed
    network = json.loads((out / "network.json").read_text())
    assert network == {"widths": [10, 2, 1], "activation": "tanh", "affine": False}
    assert ecdist.Config.from_json((out / "config.json").read_text()) == result.config
    students = pq.read_table(out / "students.parquet")
    assert students.num_rows == 8 and sorted(students.column("student").to_pylist()) == list(range(8))
    assert set(students.column("status").to_pylist()) <= {"converged", "stalled", "active"}
    hist = pq.read_table(out / "history.parquet")
    assert hist.column_names == ["step", "student", "rel_loss"] and hist.num_rows == result.history.size
    neurons = pq.read_table(out / "layer_1_neurons.parquet")
    assert neurons.num_rows == 8 * 8  # every student neuron
    assert {"student", "cluster", "dropped", "contribution", "vector"} <= set(neurons.column_names)
    clusters = pq.read_table(out / "layer_1_clusters.parquet")
    kept = [n for n in clusters.column("neuron").to_pylist() if n >= 0]
    assert sorted(kept) == [0, 1]


def test_load_a_missing_folder(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        ecdist.load(tmp_path / "nothing-here")


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _edit_json(**changes):
    return lambda p: p.write_text(json.dumps(json.loads(p.read_text()) | changes))


BREAKAGES = {
    "report.json missing": ("report.json", lambda p: p.unlink()),
    "report.json corrupt": ("report.json", _truncate),
    "report.json other schema": ("report.json", _edit_json(schema=99)),
    "config.json missing": ("config.json", lambda p: p.unlink()),
    "config.json corrupt": ("config.json", _truncate),
    "config.json bad value": ("config.json", _edit_json(gamma=3)),
    "network.json missing": ("network.json", lambda p: p.unlink()),
    "network.json corrupt": ("network.json", _truncate),
    "network.safetensors missing": ("network.safetensors", lambda p: p.unlink()),
    "students.parquet missing": ("students.parquet", lambda p: p.unlink()),
    "students.parquet corrupt": ("students.parquet", _truncate),
    "history.parquet corrupt": ("history.parquet", _truncate),
    "layer_1_neurons.parquet missing": ("layer_1_neurons.parquet", lambda p: p.unlink()),
    "layer_1_clusters.parquet corrupt": ("layer_1_clusters.parquet", _truncate),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_load_a_broken_folder_names_the_file(run, tmp_path, case):
    name, breakage = BREAKAGES[case]
    out = run[1].save(tmp_path / "res")
    breakage(out / name)
    with pytest.raises(RunFolderError, match=name.replace(".", r"\.")):
        ecdist.load(out)


def test_load_a_network_of_the_wrong_shape(run, tmp_path):
    out = run[1].save(tmp_path / "res")
    (out / "network.json").write_text(json.dumps({"widths": [10, 3, 1], "activation": "tanh", "affine": False}))
    with pytest.raises(RunFolderError, match="network"):
        ecdist.load(out)


def test_load_corrupt_safetensors_names_the_file(run, tmp_path):
    out = run[1].save(tmp_path / "res")
    _truncate(out / "network.safetensors")
    with pytest.raises(RunFolderError) as info:
        ecdist.load(out)
    assert "network.safetensors" in str(info.value)


def test_load_config_missing_a_field(run, tmp_path):
    out = run[1].save(tmp_path / "res")
    data = json.loads((out / "config.json").read_text())
    del data["activation"]
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(RunFolderError, match="config.json"):
        ecdist.load(out)


# ----- run folders --------------------------------------------------------------------------------------
def test_run_folder_contents(run):
    folder, result = run
    ident = json.loads((folder / "run.json").read_text())
    assert ident["config"] == config().fingerprint()
    assert ident["data"] == result.plan["data_fingerprint"]
    assert ecdist.Config.from_json((folder / "config.json").read_text()) == config()
    for name in RESULT_FILES:
        assert (folder / name).is_file(), name
    assert_same_network(ecdist.load(folder).network, result.network)  # a run folder is a result folder
    # the pack checkpoint is a plain .npz holding the finished students
    with np.load(checkpoint(folder), allow_pickle=False) as z:
        ck = {k: z[k] for k in z.files}
    assert bool(ck["done"]) and str(ck["phase"]) == "done"
    assert ck["ids"].tolist() == list(range(8)) and int(ck["steps"]) == result.students.column("steps")[0].as_py()
    pack = StudentPack.from_state(ck, "tanh")
    X, Y = queries(), ecdist.teachers.query(teacher(), queries())
    Xs = torch.as_tensor(Standardizer.fit(X)(X))
    Ys = torch.as_tensor(Standardizer.fit(Y)(Y))
    # the students in the checkpoint really have the losses the result reports (relative MSE)
    np.testing.assert_allclose(
        pack.mse(Xs, Ys).numpy(), np.asarray(result.students.column("rel_loss")), rtol=1e-6, atol=1e-30
    )


def test_running_again_without_resume_is_refused(run):
    folder, _ = run
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(RunFolderError, match="resume"):
        ecdist.recover(teacher(), queries(), config(), out=folder)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_resume_with_a_different_config_is_refused(run, tmp_path):
    folder = copy_run(run, tmp_path)
    with pytest.raises(RunFolderError, match=r"config differs from this one: seed=\d+ there, 1 here\)"):
        ecdist.recover(teacher(), queries(), config(seed=1), out=folder, resume=True)


def test_resume_with_different_queries_is_refused(run, tmp_path):
    folder = copy_run(run, tmp_path)
    with pytest.raises(RunFolderError, match="queries"):
        ecdist.recover(teacher(), ecdist.queries.gaussian(500, 10, seed=9), config(), out=folder, resume=True)


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="not an ecdist run folder"):
        ecdist.recover(teacher(), queries(), config(), out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "mine" / "run.json").exists()


def test_a_corrupt_run_json_is_refused_on_resume(run, tmp_path):
    folder = copy_run(run, tmp_path)
    (folder / "run.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="run.json"):
        ecdist.recover(teacher(), queries(), config(), out=folder, resume=True)


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError):
        ecdist.recover(teacher(), queries(), config(), out=tmp_path / "afile")


def unfinish(folder: Path) -> None:
    """Make a finished run folder one killed after its last checkpoint, before its result was written."""
    (folder / "report.json").unlink()


def test_resuming_a_finished_run_returns_its_stored_result(run, tmp_path):
    folder = copy_run(run, tmp_path)
    manifest = (folder / "manifest.json").read_bytes()
    events = []
    again = ecdist.recover(teacher(), queries(), config(), out=folder, resume=True, progress=record(events))
    assert [e for e, _ in events] == ["resume", "done"]  # no training, clustering or fit
    assert (folder / "manifest.json").read_bytes() == manifest  # and nothing rewritten
    original = run[1]
    assert again.layer_sizes == original.layer_sizes
    assert_same_network(again.network, original.network)
    assert again.plan == original.plan and again.students.equals(original.students)


def test_resume_reuses_the_finished_checkpoints(run, tmp_path):
    folder = copy_run(run, tmp_path)
    unfinish(folder)
    ck = checkpoint(folder)
    mtime, data = ck.stat().st_mtime_ns, ck.read_bytes()
    events = []
    again = ecdist.recover(teacher(), queries(), config(), out=folder, resume=True, progress=record(events))
    train = [i for e, i in events if e == "train"]
    assert train == [{"pack": 0, "resumed": True, "done": True}]  # no training step at all
    assert not [e for e, _ in events if e == "cluster"] and again.plan["layers_resumed"] == [1]  # nor clustering
    assert ck.stat().st_mtime_ns == mtime and ck.read_bytes() == data
    original = run[1]
    assert again.layer_sizes == original.layer_sizes
    assert_same_network(again.network, original.network)
    assert again.students.equals(original.students)  # same losses, statuses and step counts
    np.testing.assert_array_equal(again.history, original.history)
    assert_same_network(ecdist.load(folder).network, original.network)


def test_a_truncated_checkpoint_is_retrained(run, tmp_path, caplog):
    folder = copy_run(run, tmp_path)
    unfinish(folder)
    ck = checkpoint(folder)
    _truncate(ck)
    events = []
    with caplog.at_level(logging.WARNING, logger="ecdist.storage"):
        again = ecdist.recover(teacher(), queries(), config(), out=folder, resume=True, progress=record(events))
    assert any("pack_0000.npz fails its checksum" in r.getMessage() for r in caplog.records)
    steps = [i["step"] for e, i in events if e == "train" and "step" in i]
    original = run[1]
    assert steps == list(range(1, original.students.column("steps")[0].as_py() + 1))  # trained from scratch
    assert again.layer_sizes == original.layer_sizes
    assert_same_network(again.network, original.network)  # the same students, trained again
    assert again.students.equals(original.students)
    with np.load(ck, allow_pickle=False) as z:  # a whole checkpoint again
        assert bool(z["done"])


class _Killed(Exception):
    pass


def kill_at(step: int, pack: int | None = None):
    """A progress callback that kills the run when (that pack of) it reports training step ``step``."""
    def at(event, info):
        if event == "train" and info.get("step") == step and pack in (None, info.get("pack")):
            raise _Killed
    return at


def killed_run(folder: Path, cfg: ecdist.Config | None = None, step: int = 13, pack: int | None = None) -> None:
    """A new run in ``folder``, killed as ``kill_at`` says."""
    with pytest.raises(_Killed):
        ecdist.recover(teacher(), queries(), cfg or config(), out=folder, progress=kill_at(step, pack))


def test_resume_continues_a_killed_run(tmp_path, run):
    """Killed after step 13, resumed from the checkpoint of step 10: the same students and
    network as the uninterrupted run, bit for bit (the LM run's state is in the checkpoint)."""
    folder = tmp_path / "run"
    killed_run(folder)
    with np.load(checkpoint(folder), allow_pickle=False) as z:
        assert int(z["steps"]) == 10 and "done" not in z.files  # the last periodic checkpoint
    assert not (folder / "report.json").exists()

    events = []
    result = ecdist.recover(teacher(), queries(), config(), out=folder, resume=True, progress=record(events))
    steps = [i["step"] for e, i in events if e == "train" and "step" in i]
    total = result.students.column("steps")[0].as_py()
    assert steps == list(range(11, total + 1))  # picked up after step 10, not from scratch
    assert result.layer_sizes == [2]
    original = run[1]
    assert result.students.equals(original.students)
    assert np.array_equal(result.history, original.history)
    assert_same_network(result.network, original.network)
    rep = ecdist.compare(result.network, teacher(), "tanh", X=ecdist.queries.gaussian(1000, 10, seed=2))
    assert rep.max_weight_distance[0] < 1e-6
    assert ecdist.load(folder).layer_sizes == [2]


def test_an_adam_run_checkpoints_its_current_weights(tmp_path):
    """Adam students checkpoint every 10 epochs, with the weights of that epoch (they trained a copy
    that reached the pack only at the end): killed at epoch 30, the checkpoint of epoch 20 reproduces
    its recorded losses' order of magnitude, is not the initialisation, and train=False clusters it."""
    folder = tmp_path / "run"
    killed_run(folder, config(optimizer="adam", finish_lm=False, max_epochs=60, lr=1e-2), step=30)  # before its checkpoint
    with np.load(checkpoint(folder), allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    assert int(state["steps"]) == 20 and str(state["phase"]) == "adam"
    pack = StudentPack.from_state(state, "tanh")
    fresh = StudentPack.init(pack.widths, "tanh", pack.ids.tolist(), seed=0)
    assert not torch.equal(pack.theta, fresh.theta)
    Xs = torch.as_tensor(Standardizer.fit(queries())(queries()))
    Y = ecdist.teachers.query(teacher(), queries())
    Ys = torch.as_tensor(Standardizer.fit(Y)(Y))
    full = pack.mse(Xs, Ys).numpy()  # the logged losses are epoch means over minibatches: close, not equal
    assert np.all(full < 0.5 * fresh.mse(Xs, Ys).numpy()) and np.all(np.abs(np.log10(full / state["rel_loss"])) < 1)
    now = ecdist.recover(None, None, None, out=folder, resume=True, train=False)
    assert now.students.column("steps").to_pylist() == [20] * 8


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_false_recovers_from_a_run_in_progress_and_leaves_it_be(tmp_path, run):
    """A run stopped at step 13 (checkpoint of step 10): ``train=False`` clusters the students as that
    checkpoint holds them, writes nothing into the folder, and the run then resumes to the same end as
    one never looked at."""
    folder = tmp_path / "run"
    killed_run(folder)
    (folder / "checkpoints" / ".pack_0000.npz.in-flight.tmp").write_bytes(b"a write of the training run")
    before = _tree(folder)
    now = ecdist.recover(None, None, None, out=folder, resume=True, train=False)
    assert _tree(folder) == before  # not a byte written, and a live writer's temporary left alone
    assert now.students.column("steps").to_pylist() == [10] * 8
    with np.load(checkpoint(folder), allow_pickle=False) as z:
        np.testing.assert_array_equal(now.students.column("rel_loss").to_numpy(), z["rel_loss"])
    assert now.network.hidden_widths == now.layer_sizes and now.final_rel_mse > 0
    result = ecdist.recover(teacher(), queries(), config(), out=folder, resume=True)
    original = run[1]
    assert result.students.equals(original.students) and np.array_equal(result.history, original.history)
    assert_same_network(result.network, original.network)
    # a finished run: its stored result, as with train=True
    assert_same_network(ecdist.recover(None, None, None, out=folder, resume=True, train=False).network, original.network)


def test_train_false_may_cluster_otherwise_but_not_change_the_students(tmp_path, run):
    """A look at the checkpoints may change the clustering and reconstruction settings (SNAPSHOT_FIELDS):
    a finished run is then clustered anew, not answered with its stored result, and the folder is
    left as it was. A field that shapes the students is refused, and so is any change when training."""
    folder = copy_run(run, tmp_path)
    before = _tree(folder)
    other = run[1].config.replace(gamma=0.75, cluster_rule="reference")
    now = ecdist.recover(None, None, other, out=folder, resume=True, train=False)
    assert _tree(folder) == before
    assert now.config == other
    assert now.layers[0].clustering.min_students == 6 != run[1].layers[0].clustering.min_students == 4
    assert now.layers[0].clustering.rule == "reference" != run[1].layers[0].clustering.rule
    assert set(SNAPSHOT_FIELDS) >= set(RECLUSTER_FIELDS) | {"upper_widths"}
    with pytest.raises(RunFolderError, match=r"student_widths=\[8\] there, \[6\] here.*may change gamma, beta"):
        ecdist.recover(None, None, other.replace(student_widths=[6]), out=folder, resume=True, train=False)
    with pytest.raises(RunFolderError, match="gamma=0.5 there, 0.75 here"):
        ecdist.recover(None, None, other, out=folder, resume=True)
    assert _tree(folder) == before


def test_a_kept_look_is_a_run_of_its_own(tmp_path, run):
    """``train=False, snapshot=DIR``: DIR becomes a run from the students as checkpointed at step 10, marked
    done (the look trains them no further), with the in-memory look's result; the same call again answers
    with it as stored, and so does resuming DIR as a run. The run's folder keeps every byte."""
    folder = tmp_path / "run"
    killed_run(folder)
    before = _tree(folder)
    memory = ecdist.recover(None, None, None, out=folder, resume=True, train=False)
    look = tmp_path / "look"
    kept = ecdist.recover(None, None, None, out=folder, resume=True, train=False, snapshot=look)
    assert _tree(folder) == before
    assert_same_network(kept.network, memory.network)
    assert kept.students.column("steps").to_pylist() == [10] * 8 and kept.config.backend == "local"
    origin = json.loads((look / "run.json").read_text())["snapshot_of"]
    assert origin == {"run": str(folder.resolve()), "data": storage.RunFolder(folder).identity()["data"], "steps": [10]}
    with np.load(checkpoint(look), allow_pickle=False) as z:
        assert z["done"] and int(z["steps"]) == 10
    assert_same_network(ecdist.load(look).network, memory.network)
    stored = _tree(look)
    events = []
    again = ecdist.recover(None, None, None, out=folder, resume=True, train=False, snapshot=look,
                           progress=lambda e, i: events.append((e, i)))
    assert ("resume", {"finished": True}) in events and _tree(look) == stored
    assert_same_network(again.network, memory.network)
    assert_same_network(ecdist.recover(None, None, None, out=look, resume=True).network, memory.network)
    assert _tree(folder) == before


def test_a_kept_look_refuses_what_is_not_its_folder(tmp_path, run):
    folder = copy_run(run, tmp_path)
    unfinish(folder)
    with pytest.raises(ConfigError, match="give it with train=False"):
        ecdist.recover(None, None, None, out=folder, resume=True, snapshot=tmp_path / "look")
    with pytest.raises(ConfigError, match="outside the run's"):
        ecdist.recover(None, None, None, out=folder, resume=True, train=False, snapshot=folder / "look")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not an ecdist run folder"):
        ecdist.recover(None, None, None, out=folder, resume=True, train=False, snapshot=tmp_path / "foreign")
    with pytest.raises(RunFolderError, match="not a look at"):  # a run of the same data, not a look at this one
        ecdist.recover(None, None, None, out=folder, resume=True, train=False, snapshot=run[0])
    look = tmp_path / "look"
    ecdist.recover(None, None, None, out=folder, resume=True, train=False, snapshot=look)
    with pytest.raises(RunFolderError, match="gamma=0.5 there, 0.75 here"):  # the look keeps its own settings
        ecdist.recover(None, None, run[1].config.replace(gamma=0.75), out=folder, resume=True, train=False, snapshot=look)
    twin = tmp_path / "twin"  # the same run's data and students in another folder: not the run looked at
    shutil.copytree(folder, twin)
    with pytest.raises(RunFolderError, match=f"not a look at {twin}.*snapshot_of names {folder.resolve()}"):
        ecdist.recover(None, None, None, out=twin, resume=True, train=False, snapshot=look)
    storage.RunFolder(look).files.remove("checkpoints/pack_0000.npz")  # as if stopped while it was made
    with pytest.raises(RunFolderError, match="stopped while it copied the run's students; delete the folder"):
        ecdist.recover(None, None, None, out=folder, resume=True, train=False, snapshot=look)
    assert not (tmp_path / "foreign" / "run.json").exists()


def test_train_false_needs_a_run_with_every_pack_checkpointed(tmp_path):
    with pytest.raises(ecdist.ConfigError, match="give out=RUN_DIR and resume=True"):
        ecdist.recover(teacher(), queries(), config(), train=False)
    with pytest.raises(ecdist.RunFolderError, match="no run in that folder to recover from"):
        ecdist.recover(None, None, None, out=tmp_path / "none", resume=True, train=False)
    folder = tmp_path / "run"
    killed_run(folder, config(pack_size=4), step=5, pack=1)  # the first pack trained to the end, the second not yet checkpointed
    with pytest.raises(ecdist.RunFolderError, match=r"hold 4 student rows \(4 of the run's 8 students\); a pack that has not written"):
        ecdist.recover(None, None, None, out=folder, resume=True, train=False)


def test_a_resume_into_fewer_packs_drops_the_extra_checkpoints(tmp_path):
    """Packs of 2 students, killed in the fourth pack; resumed as packs of 4: the checkpoints of packs 2
    and 3 go (their students now belong to packs 0 and 1), so no reader takes them for the run's."""
    folder = tmp_path / "run"
    killed_run(folder, config(pack_size=2), step=13, pack=3)
    assert storage.RunFolder(folder).pack_indices() == [0, 1, 2, 3]
    with pytest.raises(_Killed):
        ecdist.recover(None, None, config(pack_size=4), out=folder, resume=True, progress=kill_at(1, pack=0))
    assert storage.RunFolder(folder).pack_indices() == [0, 1]
    assert not (folder / "checkpoints" / "pack_0002.npz").exists()
    # packs 0 and 1 still hold the old split (students 0–3) until they write their first checkpoint
    with pytest.raises(RunFolderError, match=r"hold 4 student rows \(4 of the run's 8 students\)"):
        ecdist.recover(None, None, None, out=folder, resume=True, train=False)


def test_train_false_on_a_damaged_checkpoint_says_which(tmp_path, run):
    folder = copy_run(run, tmp_path)
    unfinish(folder)
    _truncate(checkpoint(folder))
    with pytest.raises(RunFolderError, match="pack_0000.npz fails its checksum"):
        ecdist.recover(None, None, None, out=folder, resume=True, train=False)


def test_train_false_looks_at_a_gpu_run_from_a_machine_without_one(tmp_path, run):
    """A run folder as a CUDA run writes it (config device="cuda", plain-array checkpoints) is recovered
    on the CPU when torch sees no GPU; its config still says cuda."""
    if torch.cuda.is_available():
        pytest.skip("the point is a machine without CUDA")
    src = storage.RunFolder(run[0])
    X, Y = src.data()
    gpu = run[1].config.replace(device="cuda")
    folder = storage.RunFolder.create(tmp_path / "gpu-run", gpu, X, Y, src.identity()["data"], src.identity()["teacher"])
    folder.save_pack(0, src.load_pack(0))
    now = ecdist.recover(None, None, None, out=folder.path, resume=True, train=False)
    assert now.config.device == "cuda" and now.plan["device"] == "cpu"
    assert_same_network(now.network, run[1].network)
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):  # training there still needs the GPU
        ecdist.recover(None, None, None, out=folder.path, resume=True)


def test_train_false_does_not_repair_damaged_data(tmp_path, run):
    folder = copy_run(run, tmp_path)
    unfinish(folder)
    _truncate(folder / "answers.npy")
    before = _tree(folder)
    with pytest.raises(RunFolderError, match="answers.npy.*resume the run \\(training\\) with the teacher"):
        ecdist.recover(teacher(), queries(), None, out=folder, resume=True, train=False)
    assert _tree(folder) == before


def test_resume_in_a_new_folder_just_runs(tmp_path, run):
    result = ecdist.recover(teacher(), queries(), config(), out=tmp_path / "fresh", resume=True)
    assert (tmp_path / "fresh" / "run.json").is_file()
    assert_same_network(result.network, run[1].network)


# ----- recluster ------------------------------------------------------------------------------------------
def test_recluster_with_the_reference_rule(run):
    _, result = run
    again = ecdist.recluster(result, teacher(), queries(), cluster_rule="reference")
    assert again.config == result.config.replace(cluster_rule="reference")
    assert result.config.cluster_rule == "stable"  # the original is untouched
    assert again.layer_sizes == [2]
    assert again.students is result.students  # no retraining
    assert again.comparison is None
    clustering = again.layers[0].clustering
    assert clustering.rule == "reference" and np.isfinite(clustering.cut_height)
    rep = ecdist.compare(again.network, teacher(), "tanh", X=ecdist.queries.gaussian(1000, 10, seed=2))
    assert rep.max_weight_distance[0] < 1e-6 and rep.functional_mse < 1e-12


def test_recluster_a_loaded_result(run):
    folder, result = run
    from_disk = ecdist.recluster(ecdist.load(folder), teacher(), queries(), gamma=0.75)
    in_memory = ecdist.recluster(result, teacher(), queries(), gamma=0.75)
    assert from_disk.layer_sizes == in_memory.layer_sizes == [2]
    assert_same_network(from_disk.network, in_memory.network)


@pytest.mark.parametrize("change", [{"n_students": 9}, {"seed": 1}, {"student_widths": [6]}, {"activation": "relu"}])
def test_recluster_refuses_changes_that_need_training(run, change):
    (name,) = change
    with pytest.raises(ConfigError, match=name):
        ecdist.recluster(run[1], teacher(), queries(), **change)


def test_recluster_validates_its_changes(run):
    with pytest.raises(ConfigError, match="^gamma:"):
        ecdist.recluster(run[1], teacher(), queries(), gamma=2.0)


def test_recluster_refuses_other_queries_or_teacher(run):
    with pytest.raises(QueryError, match="not the ones"):
        ecdist.recluster(run[1], teacher(), ecdist.queries.gaussian(500, 10, seed=2))
    other = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=1)
    with pytest.raises(QueryError, match="not the ones"):
        ecdist.recluster(run[1], other, queries())


def test_a_rewrite_killed_halfway_leaves_a_file_the_manifest_accepts(tmp_path):
    """Files.write records the new checksum as pending before renaming the file into place: a
    process killed between the two leaves the old file or the new one, and both are accepted;
    anything else still fails its checksum."""
    import hashlib

    from ecdist.storage import Files, atomic_write

    files = Files(tmp_path)
    files.write("checkpoints/pack_0000.npz", b"step 20")
    entries = files.entries()
    new = b"step 30"
    entries["checkpoints/pack_0000.npz"]["pending"] = {"sha256": hashlib.sha256(new).hexdigest(), "size": len(new)}
    files._write_manifest(entries)  # the manifest as the first half of a rewrite leaves it
    assert files.read("checkpoints/pack_0000.npz") == b"step 20"  # killed before the rename
    atomic_write(tmp_path / "checkpoints" / "pack_0000.npz", new)
    assert files.read("checkpoints/pack_0000.npz") == new  # killed after the rename
    atomic_write(tmp_path / "checkpoints" / "pack_0000.npz", b"step 3X")
    with pytest.raises(RunFolderError, match="fails its checksum"):
        files.read("checkpoints/pack_0000.npz")
    files.write("checkpoints/pack_0000.npz", b"step 40")  # a completed write leaves no pending entry
    assert "pending" not in files.entries()["checkpoints/pack_0000.npz"]
