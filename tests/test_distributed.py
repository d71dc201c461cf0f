"""Ray backend: packs as actors on a real local Ray and a real 3-node cluster on this machine.

Every run is compared with the in-process result for the same seed, bit for bit: MKL's
reproducible mode makes a student's arithmetic independent of how the students are split,
so "the same network" can be asserted exactly, also after actors are killed mid-training.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

import ecdist
from ecdist import distributed
from ecdist.errors import ConfigError, EcdistError

pytestmark = pytest.mark.slow


def teacher():
    return ecdist.teachers.random_mlp([8, 3, 1], "tanh", seed=2)


def queries():
    return ecdist.queries.gaussian(2000, 8, seed=3)


def config(**changes):
    # student_tol 0: students train on until they stall at machine precision, long enough to be
    # killed mid-way; 4 students → two packs of two on two CPUs
    base = ecdist.Config(activation="tanh", student_widths=[12], n_students=4, seed=1, student_tol=0.0,
                         lm_max_iter=150, threads=1)
    return base.replace(**changes)


@pytest.fixture(scope="module")
def reference():
    """The in-process result: what every Ray run must reproduce."""
    return ecdist.recover(teacher(), queries(), config(backend="local"))


def assert_same_recovery(a, b):
    assert a.layer_sizes == b.layer_sizes
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for col in ("student", "rel_loss", "status", "restarts"):
        assert a.students.column(col).equals(b.students.column(col)), col


@pytest.fixture
def fast_polls(monkeypatch):
    """Poll the actors' progress often, so a test can act while a pack is still training."""
    monkeypatch.setattr(distributed, "PROGRESS_EVERY", 0.05)


# ----- one machine: a local Ray ----------------------------------------------------------------------
def test_auto_starts_a_local_ray_and_stops_it(reference):
    """First in the module, before the ray_local fixture: no Ray is running yet."""
    import ray

    assert not ray.is_initialized()
    result = ecdist.recover(teacher(), queries(), config())
    assert result.plan["backend"] == "ray" and result.plan["ray_started_here"] is True
    assert not ray.is_initialized()  # shut down again
    assert_same_recovery(result, reference)


def test_ray_backend_equals_in_process(ray_local, reference):
    result = ecdist.recover(teacher(), queries(), config(backend="ray"))
    assert result.plan["backend"] == "ray" and reference.plan["backend"] == "local"
    assert result.plan["pack_sizes"] == [2, 2] and reference.plan["pack_sizes"] == [4]  # split differently…
    assert_same_recovery(result, reference)  # …and the same students, bit for bit
    assert result.plan["ray_started_here"] is False  # the running Ray was used as is
    assert ray_local.is_initialized()
    assert reference.layer_sizes == [3]


def test_auto_uses_the_running_ray(ray_local, reference):
    result = ecdist.recover(teacher(), queries(), config())  # backend "auto"
    assert result.plan["backend"] == "ray" and result.plan["actor_slots"] == 2
    assert_same_recovery(result, reference)


def test_adam_students_are_the_same_on_every_backend(ray_local):
    """Adam, then LM: packs of two on Ray and one pack of four in-process train the same students
    (one minibatch order for all packs; a student's gradient does not depend on its pack)."""
    adam = config(optimizer="adam", max_epochs=40, lr=1e-2, batch_size=256, finish_lm=True, lm_max_iter=60)
    on_ray = ecdist.recover(teacher(), queries(), adam.replace(backend="ray"))
    local = ecdist.recover(teacher(), queries(), adam.replace(backend="local"))
    assert on_ray.plan["pack_sizes"] == [2, 2] and local.plan["pack_sizes"] == [4]
    assert_same_recovery(on_ray, local)


def test_packs_stream_back_as_arrow(ray_local):
    cfg = config(backend="ray", lm_max_iter=5)
    X, Y = queries(), ecdist.teachers.query(teacher(), queries())
    plan = ecdist.pipeline._plan(cfg, 8, 1, ray_resources=distributed.resources())
    results = list(distributed.train_packs(cfg, plan, X, Y, None, lambda e, i: None))
    assert sorted(r.index for r in results) == [0, 1]
    for r in results:
        assert isinstance(r.neurons, pa.RecordBatch) and isinstance(r.students, pa.RecordBatch)
        assert r.neurons.num_rows == 2 * 12 and r.neurons.schema.field("vector").type.list_size == 9
        assert r.node  # trained on a Ray node
    assert not [a for a in ray_local.util.list_named_actors() if a.startswith("ecdist-")]  # actors cleaned up


def test_progress_comes_from_the_actors(ray_local, fast_polls):
    events = []
    ecdist.recover(teacher(), queries(), config(backend="ray"), progress=lambda e, i: events.append((e, i)))
    kinds = [e for e, _ in events]
    assert kinds[0] == "query" and "plan" in kinds and "ray" in kinds and kinds[-1] == "done"
    polled = [i for e, i in events if e == "train" and "actor" in i]
    assert polled, "no progress was polled from the actors"
    assert all(i["actor"].startswith("ecdist-") and i["phase"] in ("lm", "done") for i in polled)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_killed_actor_resumes_from_its_checkpoint(ray_local, reference, tmp_path, fast_polls, how):
    killed = {}

    def kill_pack_0(event, info):
        if event == "train" and info.get("pack") == 0 and "actor" in info and info.get("step", 0) > 10 and not killed:
            killed.update(info)  # past the checkpoint of step 10, still training
            if how == "ray.kill":
                ray_local.kill(ray_local.get_actor(info["actor"], namespace="ecdist"), no_restart=False)
            else:
                os.kill(info["pid"], signal.SIGKILL)

    result = ecdist.recover(teacher(), queries(), config(), out=tmp_path / "run", progress=kill_pack_0)
    assert killed, "pack 0 finished before it could be killed"
    assert result.plan["packs_resumed_from"][0] >= 10  # the restarted actor read the checkpoint
    assert result.plan["packs_resumed_from"][1] == 0
    assert_same_recovery(result, reference)


def test_a_killed_actor_without_run_folder_starts_its_pack_again(ray_local, reference, fast_polls):
    killed = []

    def kill_pack_1(event, info):
        if event == "train" and info.get("pack") == 1 and "actor" in info and info.get("step", 0) > 5 and not killed:
            killed.append(info["step"])
            ray_local.kill(ray_local.get_actor(info["actor"], namespace="ecdist"), no_restart=False)

    result = ecdist.recover(teacher(), queries(), config(), progress=kill_pack_1)
    assert killed
    assert result.plan["packs_resumed_from"] == [0, 0]  # no checkpoint: the deterministic start again
    assert_same_recovery(result, reference)


def test_an_actor_that_keeps_dying_fails_with_a_clear_error(ray_local, tmp_path, fast_polls):
    def kill_pack_0(event, info):
        if event == "train" and info.get("pack") == 0 and "actor" in info:
            ray_local.kill(ray_local.get_actor(info["actor"], namespace="ecdist"), no_restart=False)

    with pytest.raises(distributed.PackFailed, match=r"pack 0 \(students 0–1\) failed after 0 actor restarts") as err:
        ecdist.recover(teacher(), queries(), config(actor_restarts=0), out=tmp_path / "run", progress=kill_pack_0)
    assert isinstance(err.value, EcdistError) and "resume" in str(err.value)
    assert not [a for a in ray_local.util.list_named_actors() if a.startswith("ecdist-")]


@pytest.mark.parametrize("field,value,match", [
    ("gpus_per_pack", 1.0, r"gpus_per_pack: 1 GPUs per pack, but the Ray cluster has 0 GPUs"),
    ("cpus_per_pack", 8, r"cpus_per_pack: 8 CPUs per pack, but the Ray cluster has 2 CPUs"),
])
def test_shares_the_cluster_cannot_provide_fail_fast(ray_local, field, value, match):
    with pytest.raises(ConfigError, match=match):
        ecdist.recover(teacher(), queries(), config(**{field: value}))


def test_an_address_with_the_local_backend_is_refused():
    with pytest.raises(ConfigError, match="backend='local'"):
        ecdist.recover(teacher(), queries(), config(backend="local"), address="auto")


def test_a_run_started_in_process_resumes_on_ray(ray_local, reference, tmp_path):
    """The run folder's identity leaves out where the run executes: resume it on Ray."""
    folder = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(event, info):
        if event == "train" and info.get("step") == 12:
            raise Stop

    with pytest.raises(Stop):
        ecdist.recover(teacher(), queries(), config(backend="local", pack_size=2), out=folder, progress=stop)
    result = ecdist.recover(teacher(), queries(), config(backend="ray"), out=folder, resume=True)
    assert result.plan["packs_resumed_from"][0] == 10
    assert_same_recovery(result, reference)


def test_cli_recover_on_a_running_cluster(ray_local, reference, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    t = tmp_path / "teacher.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in teacher().state_dict().items()}, t)
    X = tmp_path / "X.npy"
    np.save(X, queries())
    cmd = [sys.executable, "-m", "ecdist.cli", "recover", "--teacher", str(t), "--arch", "8-3-1", "--activation", "tanh",
           "--queries", str(X), "--student-widths", "12", "--n-students", "4", "--seed", "1", "--student-tol", "0",
           "--lm-max-iter", "150", "--out", str(tmp_path / "out"), "--address", address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = ecdist.load(tmp_path / "out")
    assert result.plan["backend"] == "ray" and result.plan["ray_started_here"] is False
    assert_same_recovery(result, reference)


# ----- several nodes: ray.cluster_utils.Cluster ------------------------------------------------------
def test_packs_land_on_different_nodes(ray_cluster, reference):
    cluster, workers = ray_cluster
    result = ecdist.recover(teacher(), queries(), config())
    nodes = result.plan["pack_nodes"]
    assert len(set(nodes)) == 2 and set(nodes) <= {w.node_id for w in workers}  # one pack per worker
    assert_same_recovery(result, reference)


def test_a_share_no_single_node_has_fails_fast(ray_cluster):
    """Two CPUs in all but one per node: a 2-CPU pack actor would be pending for ever."""
    with pytest.raises(ConfigError, match=r"cpus_per_pack: 2 CPUs per pack, but the largest node .* has 1"):
        ecdist.recover(teacher(), queries(), config(cpus_per_pack=2))


def test_a_node_lost_mid_training_still_finishes(ray_cluster, reference, tmp_path, fast_polls):
    """A third node joins; the node that trains pack 0 is removed while it trains: Ray restarts
    the actor elsewhere and it resumes from the checkpoint in the (shared) run folder."""
    cluster, workers = ray_cluster
    spare = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    removed = {}

    def lose_node(event, info):
        if event == "train" and info.get("pack") == 0 and "actor" in info and info.get("step", 0) > 10 and not removed:
            victim = next(n for n in [*workers, spare] if n.node_id == info["node"])
            removed["node"] = info["node"]
            cluster.remove_node(victim)

    result = ecdist.recover(teacher(), queries(), config(), out=tmp_path / "run", progress=lose_node)
    assert removed, "pack 0 finished before its node could be removed"
    assert removed["node"] not in result.plan["pack_nodes"]
    assert result.plan["packs_resumed_from"][0] >= 10
    assert_same_recovery(result, reference)
