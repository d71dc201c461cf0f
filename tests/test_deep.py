"""Deep, layer-by-layer recovery: insertion of a recovered layer, and end to end on 2-hidden-layer teachers.

The insertion must keep every student's function when the recovered layer is the student's own
(sign flips folded into the outgoing sums, a sigmoid's flip into the next bias); end to end, the
layer-2 clustering must read the fine-tuned students, and Ray must reproduce the in-process run
bit for bit.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import ecdist
from ecdist import activations
from ecdist.packs import inserted, lm_options
from ecdist.students import StudentPack


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "g"])
def test_inserting_a_students_own_layer_keeps_its_function(activation):
    """Two students; the recovered layer is student 0's canonical first layer with one neuron
    duplicated in student 1 (the duplicates' outgoing weights must add up)."""
    act = activations.get(activation)
    X = torch.as_tensor(np.random.default_rng(0).standard_normal((50, 4)))
    pack = StudentPack.init([4, 5, 3, 2], activation, [0, 1], seed=3)
    with torch.no_grad():
        pack.block(0)[1] = pack.block(0)[0]  # student 1 has student 0's first layer…
        twin = pack.block(0)[0, 3] if act.symmetry.name == "none" else -pack.block(0)[0, 3]
        pack.block(0)[1, 4] = twin  # …with neuron 4 a copy of neuron 3 (sign-flipped where that is a symmetry)
    before = pack.forward(X)
    vec = pack.block(0)[0].numpy()
    V = act.symmetry.canonicalize(vec).vectors  # the recovered layer: student 0's neurons, canonical
    assign = np.concatenate([np.arange(5), [0, 1, 2, 3, 3]])
    up = inserted(pack, assign, 5)
    assert up.widths == [5, 3, 2] and up.k == 2
    H = act.fn(torch.cat([X, torch.ones(50, 1, dtype=X.dtype)], 1) @ torch.as_tensor(V).T)
    after = up.forward(H)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-12)
    # student 1's neuron 4 is no unit of its own any more: recovered neuron 3 carries its weight
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-12)


def test_unassigned_neurons_are_dropped():
    pack = StudentPack.init([3, 4, 2, 1], "tanh", [0, 1], seed=0)
    up = inserted(pack, np.array([0, -1, 1, -1, 1, 0, -1, -1]), 2)
    W = up.weight(0).numpy()  # (k, 2, 2): into the next layer from the 2 recovered neurons
    out = pack.weight(1).numpy()
    vec = pack.block(0).reshape(8, -1).numpy()
    can = activations.get("tanh").symmetry.canonicalize(vec, out.transpose(0, 2, 1).reshape(8, -1))
    np.testing.assert_allclose(W[0, :, 0], can.outgoing[0])
    np.testing.assert_allclose(W[0, :, 1], can.outgoing[2])
    np.testing.assert_allclose(W[1, :, 0], can.outgoing[5])
    np.testing.assert_allclose(W[1, :, 1], can.outgoing[4])
    np.testing.assert_array_equal(up.weight(1).numpy(), pack.weight(2).numpy())  # upper layers unchanged


# ----- end to end ---------------------------------------------------------------------------------
ARCH = [6, 4, 3, 1]


TEACHER_SEED = 22  # the first seed whose neurons all matter (see test_the_deep_teacher_is_identifiable)


def deep_teacher():
    return ecdist.teachers.random_mlp(ARCH, "tanh", seed=TEACHER_SEED)


def test_the_deep_teacher_is_identifiable():
    """Random teachers with N(0, 1) output weights often hide a neuron: seed 0 has output weights
    0.26 and −0.31, seed 3 has 0.03 and −0.05, and students at relative MSE 1e-7 cannot see such a
    neuron, so its layer comes back a neuron short (measured: widths [3, 1] for seed 0). The end-to-end
    test needs a teacher whose every neuron carries weight: |output weight| and the norms of each
    neuron's incoming and outgoing weights all above 0.6."""
    (W1, _), (W2, _), (A, _) = [(lin.weight.detach().numpy(), lin.bias.detach().numpy()) for lin in deep_teacher().layers]
    assert np.abs(A).min() > 0.6 and np.linalg.norm(W2, axis=0).min() > 0.6 and np.linalg.norm(W1, axis=1).min() > 0.6


def deep_queries():
    return ecdist.queries.gaussian(600, ARCH[0], seed=1)


def deep_config(**changes):
    base = ecdist.Config(activation="tanh", student_widths=[12, 9], n_students=8, seed=0, threads=1)
    return base.replace(**changes)


def test_lm_geodesic_accelerates_deep_students_only():
    """"deep" (the default) accelerates students with two or more hidden layers; shallow students,
    whose plain LM reaches machine precision in tens of iterations, keep it."""
    config = deep_config()
    assert config.lm_geodesic == "deep"
    assert lm_options(config, n_layers=3).geodesic and not lm_options(config, n_layers=2).geodesic
    assert lm_options(config.replace(lm_geodesic="always"), n_layers=2).geodesic
    assert not lm_options(config.replace(lm_geodesic="never"), n_layers=3).geodesic
    assert lm_options(config, 3, finetune=True).restarts == 0 and lm_options(config, 3).restarts == config.restarts


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep") / "run"
    return out, ecdist.recover(deep_teacher(), deep_queries(), deep_config(backend="local"), out=out)


@pytest.mark.slow
def test_deep_recovers_every_width_and_the_function(deep_run):
    _, result = deep_run
    fresh = ecdist.queries.gaussian(2000, ARCH[0], seed=99)
    report = ecdist.compare(result.network, deep_teacher(), "tanh", X=fresh)
    assert result.layer_sizes == [4, 3] == report.teacher_sizes
    assert result.network.widths == ARCH
    assert report.functional_mse < 1e-8
    assert len(report.max_weight_distance) == 2 and max(report.max_weight_distance) < 1e-4


@pytest.mark.slow
def test_deep_result_has_a_table_per_layer(deep_run):
    _, result = deep_run
    report = ecdist.compare(result.network, deep_teacher(), "tanh")
    assert [layer.index for layer in result.layers] == [1, 2]
    assert result.layer_sizes == [layer.width for layer in result.layers] == result.network.hidden_widths
    assert len(report.max_weight_distance) == len(report.teacher_sizes) == 2
    k1 = result.layer_sizes[0]
    assert result.layers[0].neurons.num_rows == 8 * 12 and result.layers[1].neurons.num_rows == 8 * 9
    assert result.layers[1].neurons.column("vector").type.list_size == k1 + 1  # in the recovered layer-1 basis


@pytest.mark.slow
def test_layer_2_is_read_from_the_fine_tuned_students(deep_run):
    """The layer-2 table holds the canonical first layer of the packs checkpointed after the
    insertion and fine-tune (K₁ + 1 inputs), not the trained students' second layer."""
    out, result = deep_run
    act = activations.get("tanh")
    state = dict(np.load(out / "checkpoints" / "pack_0000_layer_2.npz"))
    trained = dict(np.load(out / "checkpoints" / "pack_0000.npz"))
    tuned = StudentPack.from_state(state, "tanh")
    assert tuned.widths == [result.layer_sizes[0], 9, 1]
    assert int(state["steps"]) > int(trained["steps"])  # fine-tuning steps happened after the training
    can = act.symmetry.canonicalize(tuned.block(0).reshape(tuned.k * 9, -1).numpy())
    table = result.layers[1].neurons
    vectors = np.asarray(table.column("vector").combine_chunks().flatten()).reshape(table.num_rows, -1)
    np.testing.assert_array_equal(vectors, can.vectors)
    stale = StudentPack.from_state(trained, "tanh").block(1).reshape(-1, 13).numpy()
    assert vectors.shape[1] == result.layer_sizes[0] + 1 != stale.shape[1]


@pytest.mark.slow
def test_deep_result_round_trips_and_resumes(deep_run, tmp_path):
    out, result = deep_run
    back = ecdist.load(out)
    assert back.layer_sizes == result.layer_sizes and len(back.layers) == 2
    for a, b in zip(back.network.state_dict().values(), result.network.state_dict().values()):
        assert torch.equal(a, b)
    assert back.layers[1].neurons.equals(result.layers[1].neurons)
    events = []
    again = ecdist.recover(deep_teacher(), deep_queries(), deep_config(backend="local"), out=out, resume=True,
                           progress=lambda e, i: events.append((e, i)))
    assert not [i for e, i in events if e == "train" and "step" in i]  # every stage came from its checkpoint
    for a, b in zip(again.network.state_dict().values(), result.network.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ecdist.ConfigError, match="recluster"):
        ecdist.recluster(result, deep_teacher(), deep_queries(), gamma=0.75)


@pytest.mark.slow
def test_train_false_on_a_deep_run_fine_tunes_in_memory_only(deep_run, tmp_path):
    """``recover(train=False)`` on a deep run whose result is not written yet: the layer-1 pack checkpoints
    are clustered, the insertions and fine-tunes happen in memory, and nothing in the folder changes —
    not even the layer-2 checkpoints, which it neither reads nor writes."""
    out, result = deep_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    (folder / "report.json").unlink()  # as if killed before the result was written
    before = {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    events = []
    now = ecdist.recover(None, None, None, out=folder, resume=True, train=False,
                         progress=lambda e, i: events.append((e, i)))
    assert {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before
    assert not [e for e, _ in events if e == "resume"]  # no stage came from the folder
    done = [i["layer"] for e, i in events if e == "train" and i.get("phase") == "done"]
    assert done == [2] * len(now.plan["pack_sizes"])  # every pack fine-tuned anew above the recovered layer 1
    assert now.layer_sizes == result.layer_sizes == [4, 3]
    report = ecdist.compare(now.network, deep_teacher(), "tanh", X=ecdist.queries.gaussian(2000, ARCH[0], seed=99))
    assert report.functional_mse < 1e-8


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """The deep run with fresh students of width 14 above the inserted layer (``upper_widths``)."""
    out = tmp_path_factory.mktemp("deep-fresh") / "run"
    return out, ecdist.recover(deep_teacher(), deep_queries(), deep_config(backend="local", upper_widths=[14]), out=out)


@pytest.mark.slow
def test_fresh_students_above_the_inserted_layer(fresh_run, deep_run):
    """With upper_widths the layer-2 neurons come from fresh students 14 wide on the recovered layer 1
    (the trained students' second layer is 9 wide), and every width and the function come back."""
    out, result = fresh_run
    assert result.layer_sizes == [4, 3]
    report = ecdist.compare(result.network, deep_teacher(), "tanh", X=ecdist.queries.gaussian(2000, ARCH[0], seed=99))
    assert report.functional_mse < 1e-8 and max(report.max_weight_distance) < 1e-4
    with np.load(out / "checkpoints" / "pack_0000_layer_2.npz") as z:
        assert z["widths"].tolist() == [result.layer_sizes[0], 14, 1]
        assert z["ids"].tolist() == list(range(8))
    assert result.layers[1].neurons.num_rows == 8 * 14 != deep_run[1].layers[1].neurons.num_rows


class _Stop(Exception):
    pass


def _stop_at_layer_2_step(n: int):
    """A progress callback that kills the run at the n-th LM step event above layer 1."""
    seen = []

    def kill(event, info):
        if event == "train" and info.get("layer") == 2 and "step" in info:
            seen.append(info["step"])
            if len(seen) == n:
                raise _Stop

    return kill


@pytest.mark.slow
def test_fresh_students_resume_from_their_checkpoint(fresh_run, tmp_path):
    """Killed at the 13th LM step of the fresh students above layer 1: resumed from their step-10
    checkpoint, the run ends with the uninterrupted run's network, bit for bit."""
    folder = tmp_path / "run"
    with pytest.raises(_Stop):
        ecdist.recover(deep_teacher(), deep_queries(), deep_config(backend="local", upper_widths=[14]), out=folder,
                       progress=_stop_at_layer_2_step(13))
    with np.load(folder / "checkpoints" / "pack_0000_layer_2.npz") as z:
        assert z["widths"].tolist()[1] == 14 and "done" not in z.files
    again = ecdist.recover(None, None, None, out=folder, resume=True)
    for k, v in fresh_run[1].network.state_dict().items():
        assert torch.equal(again.network.state_dict()[k], v), k


def test_upper_widths_are_one_per_layer_above_the_first():
    with pytest.raises(ecdist.ConfigError, match=r"upper_widths: got \[14, 14\] for student_widths \[12, 9\]"):
        deep_config(upper_widths=[14, 14])
    with pytest.raises(ecdist.ConfigError, match="one width per hidden layer above the first"):
        ecdist.Config(activation="tanh", student_widths=[12], upper_widths=[14])
    with pytest.raises(ecdist.ConfigError, match="^upper_widths: got \\[0\\]"):
        deep_config(upper_widths=[0])
    config = deep_config(upper_widths=(14,))
    assert config.upper_widths == [14] and ecdist.Config.from_json(config.to_json()) == config
    assert config.fingerprint() != deep_config().fingerprint()


@pytest.mark.slow
def test_deep_on_ray_equals_in_process(deep_run, ray_local):
    """Two packs of four on two actors, kept alive across the layers, against one in-process pack."""
    _, result = deep_run
    on_ray = ecdist.recover(deep_teacher(), deep_queries(), deep_config(backend="ray"))
    assert on_ray.plan["pack_sizes"] == [4, 4] and result.plan["pack_sizes"] == [8]
    assert on_ray.layer_sizes == result.layer_sizes
    for k, v in result.network.state_dict().items():
        assert torch.equal(on_ray.network.state_dict()[k], v), k
    for a, b in zip(on_ray.layers, result.layers):
        assert a.neurons.equals(b.neurons)


def planted_pack(teacher, xs, ys, n: int, seed: int) -> StudentPack:
    """n exact students of widths 6-8-6-1: the teacher's neurons (standardised units) in a random
    order and random signs, plus debris neurons with random incoming and zero outgoing weights."""
    rng = np.random.default_rng(seed)
    (W1, b1), (W2, b2), (A, c) = [(lin.weight.detach().numpy(), lin.bias.detach().numpy()) for lin in teacher.layers]
    W1s, b1s = W1 * xs.scale, b1 + W1 @ xs.mean  # the teacher on standardised inputs…
    As, cs = A / ys.scale[:, None], (c - ys.mean) / ys.scale  # …and outputs
    rows = []
    for _ in range(n):
        p1, s1 = rng.permutation(8), np.concatenate([rng.choice([-1.0, 1.0], 4), np.ones(4)])
        L1 = np.vstack([np.hstack([W1s, b1s[:, None]]), rng.standard_normal((4, 7))])[p1] * s1[p1, None]
        p2, s2 = rng.permutation(6), np.concatenate([rng.choice([-1.0, 1.0], 3), np.ones(3)])
        W2full = np.zeros((6, 8))
        W2full[:3, :4] = W2
        W2full[:, p1.argsort()] = W2full[:, :]  # columns follow layer 1's permutation…
        W2full = W2full * s1[p1][None, :]  # …and its signs
        W2full[3:] = rng.standard_normal((3, 8))
        L2 = np.hstack([W2full, np.concatenate([b2, rng.standard_normal(3)])[:, None]])[p2] * s2[p2, None]
        out = np.zeros((1, 6))
        out[:, :3] = As
        out = out[:, p2] * s2[p2][None, :]
        rows.append(np.concatenate([L1.ravel(), L2.ravel(), np.hstack([out, cs[:, None]]).ravel()]))
    return StudentPack(torch.as_tensor(np.stack(rows)), [6, 8, 6, 1], "tanh", list(range(n)))


def test_the_layer_chain_is_exact_on_exact_students():
    """Given students that hold the teacher exactly (what converged students would be), the chain —
    cluster layer 1, insert, fine-tune, re-read layer 2, fit, fine-tune the whole — is exact."""
    from ecdist import pipeline
    from ecdist.packs import PackTrainer
    from ecdist.queries import Standardizer

    teacher = deep_teacher()
    X = ecdist.queries.gaussian(600, 6, seed=1)
    Y = teacher.predict(X)
    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    Xs, Ys = xs(X), ys(Y)
    config = ecdist.Config(activation="tanh", student_widths=[8, 6], n_students=8, seed=0, threads=1, backend="local")
    plan = pipeline._plan(config, 6, 1)
    trainer = PackTrainer(0, list(range(8)), config, plan, None)
    trainer.pack = planted_pack(teacher, xs, ys, 8, seed=5)
    assert float(trainer.pack.mse(torch.as_tensor(Xs), torch.as_tensor(Ys)).max()) < 1e-28  # planted exactly
    results = [trainer.result(torch.as_tensor(Xs))]
    advance = pipeline._LocalAdvance(config, plan, [trainer], Ys, pipeline._quiet)
    layers, network, final, _ = pipeline._layers(config, results, advance, Xs, Ys, xs, ys, {}, pipeline._quiet)
    report = ecdist.compare(network, teacher, "tanh", X=ecdist.queries.gaussian(2000, 6, seed=99))
    assert [layer.width for layer in layers] == [4, 3] == report.teacher_sizes
    assert report.functional_mse < 1e-8 and final < 1e-16
    assert max(report.max_weight_distance) < 1e-6


def test_deep_plan_fits_every_pack_actor_at_once():
    """Deep runs keep every pack's actor until the last layer: more packs than slots share the CPUs."""
    from ecdist import pipeline

    deep = ecdist.Config(activation="tanh", student_widths=[8, 6], n_students=4, pack_size=1)
    plan = pipeline._plan(deep, 6, 1, ray_resources={"CPU": 2.0, "GPU": 0.0})
    assert len(plan["packs"]) == 4 and plan["cpus_per_pack"] == 0.5 and plan["actor_slots"] == 4
    shallow = pipeline._plan(deep.replace(student_widths=[8]), 6, 1, ray_resources={"CPU": 2.0, "GPU": 0.0})
    assert shallow["cpus_per_pack"] == 1 and shallow["actor_slots"] == 2  # one layer: packs wait their turn


@pytest.mark.slow
def test_deep_pruning_removes_what_a_generous_cut_keeps_in_every_layer():
    """The authors' cut with no debris filter keeps 7 clusters in layer 1 and 5 in layer 2 of the
    4-3 teacher; once the joint fine-tune is exact, pruning takes every layer back to the teacher's
    widths, and the cluster tables mark the pruned candidates with neuron −1."""
    result = ecdist.recover(deep_teacher(), deep_queries(), deep_config(backend="local", cluster_rule="reference", drop=0.0))
    assert result.layer_sizes == [4, 3]
    for layer in result.layers:
        neuron = np.asarray(layer.clusters.column("neuron").to_pylist())
        assert sorted(neuron[neuron >= 0].tolist()) == list(range(layer.width))
        assert (neuron == -1).any()  # this cut kept more candidates than the layer needs
    report = ecdist.compare(result.network, deep_teacher(), "tanh", X=ecdist.queries.gaussian(2000, ARCH[0], seed=99))
    assert report.teacher_sizes == [4, 3] and report.functional_mse < 1e-20
    assert max(report.max_weight_distance) < 1e-6


@pytest.mark.slow
def test_deep_g_recovers_when_students_run_on_below_1e_16():
    """g, the authors' symmetry-free activation, on a 6-4-3-1 teacher: deep g students creep, and
    the best of them cross 1e-16 while their weights are still off. Run on to student_tol 1e-28
    (what benchmarks/trained_teachers.py gives deep g teachers), every width and weight comes back;
    stopped at Config's 1e-16 the same students gave widths [5, 3] with layer 2 off by 0.08."""
    teacher = ecdist.teachers.random_mlp([6, 4, 3, 1], "g", seed=0)
    X = ecdist.queries.gaussian(600, 6, seed=1)
    config = ecdist.Config(activation="g", student_widths=[12, 9], n_students=8, seed=3, threads=1, backend="local",
                           lm_max_iter=1500, stall_window=300, student_tol=1e-28)
    result = ecdist.recover(teacher, X, config)
    report = ecdist.compare(result.network, teacher, "g", X=ecdist.queries.gaussian(2000, 6, seed=99))
    assert result.layer_sizes == [4, 3] == report.teacher_sizes
    assert max(report.max_weight_distance) < 1e-8 and report.functional_mse < 1e-16
    assert min(result.students.column("rel_loss").to_pylist()) < 1e-17  # a student ran on past 1e-16


@pytest.mark.slow
def test_a_kept_look_checkpoints_its_later_stages(deep_run, tmp_path):
    """``recover(train=False, snapshot=DIR)`` on a deep run not finished, with fresh students 14 wide above
    layer 1: they checkpoint in DIR; killed at their 13th LM step, the same call resumes them from their
    step-10 checkpoint and ends with the in-memory look's network, bit for bit. The run's folder is untouched."""
    out, _ = deep_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    (folder / "report.json").unlink()
    before = {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    cfg = deep_config(backend="local", upper_widths=[14])
    memory = ecdist.recover(None, None, cfg, out=folder, resume=True, train=False)
    look = tmp_path / "look"
    with pytest.raises(_Stop):
        ecdist.recover(None, None, cfg, out=folder, resume=True, train=False, snapshot=look, progress=_stop_at_layer_2_step(13))
    with np.load(look / "checkpoints" / "pack_0000_layer_2.npz") as z:
        assert z["widths"].tolist()[1] == 14 and "done" not in z.files
    events = []
    again = ecdist.recover(None, None, cfg, out=folder, resume=True, train=False, snapshot=look,
                           progress=lambda e, i: events.append((e, i)))
    steps = [i["step"] for e, i in events if e == "train" and i.get("layer") == 2 and "step" in i]
    assert steps and steps[0] == 11  # from the step-10 checkpoint, not from the start
    assert again.layer_sizes == memory.layer_sizes == [4, 3]
    for k, v in memory.network.state_dict().items():
        assert torch.equal(again.network.state_dict()[k], v), k
    assert {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before
