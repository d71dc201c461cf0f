"""End to end: recover small teachers of every symmetry class, and the demo through the CLI.

Each recovery must give the exact width and every teacher neuron within 1 − |cos| < 1e-4
(ReLU by direction and by the scale-invariant product ‖[w; b]‖·|a|; the even+linear classes
with the affine term). Teachers 12-3-1 from ``random_mlp`` with seed 0; the even+linear
classes are queried with std-2 Gaussian inputs, which reach the curved part of the activation
(with std 1 softplus is nearly quadratic on the data and its neurons are poorly identifiable).
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import ecdist
from ecdist import activations
from ecdist.cli import _print_result
from ecdist.cluster import cluster_layer
from ecdist.pipeline import _Attempt, _stage, _student_candidates, _to_stage
from ecdist.plots import plot_recovery, students_per_neuron

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _on_ray(ray_local):
    """These recoveries run with backend "auto", so their packs train on the module's local Ray."""
    yield

CASES = [  # activation, query std
    ("g", 1.0),
    ("tanh", 1.0),
    ("sigmoid", 1.0),
    ("softplus", 2.0),
    ("gelu", 1.0),
    ("silu", 2.0),
    ("relu", 1.0),
    ("leaky_relu", 1.0),
]


@pytest.mark.parametrize("activation,std", CASES)
def test_recovers_small_teacher_of_each_class(activation, std):
    teacher = ecdist.teachers.random_mlp([12, 3, 1], activation, seed=0)
    X = ecdist.queries.gaussian(1500, 12, seed=10, std=std)
    config = ecdist.Config(activation=activation, student_widths=[12], n_students=10, seed=0)
    result = ecdist.recover(teacher, X, config)
    report = ecdist.compare(result.network, teacher, activation, X=ecdist.queries.gaussian(2000, 12, seed=99, std=std))

    assert result.layer_sizes == [3]
    assert report.teacher_sizes == [3]
    assert max(report.max_weight_distance) < 1e-4
    assert report.functional_mse < 1e-8
    sym = activations.get(activation).symmetry
    assert (result.network.skip is not None) == sym.needs_affine
    if sym.scaling:  # ReLU: the scale moves between w and a; ‖[w; b]‖·|a| is what is identified
        t_prod = np.linalg.norm(teacher.neuron_vectors(0), axis=1) * np.abs(teacher.outgoing(0)[:, 0])
        r_prod = np.linalg.norm(result.network.neuron_vectors(0), axis=1) * np.abs(result.network.outgoing(0)[:, 0])
        np.testing.assert_allclose(np.sort(r_prod), np.sort(t_prod), rtol=1e-6)


def test_deterministic_under_seed():
    teacher = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=3)
    X = ecdist.queries.gaussian(500, 10, seed=4)
    config = ecdist.Config(activation="tanh", student_widths=[8], n_students=8, seed=5)
    a, b = ecdist.recover(teacher, X, config), ecdist.recover(teacher, X, config)
    for p_a, p_b in zip(a.network.parameters(), b.network.parameters()):
        assert np.array_equal(p_a.detach().numpy(), p_b.detach().numpy())
    assert np.array_equal(a.history, b.history)


def test_demo_command_recovers_the_calibration_teacher(tmp_path):
    """`ecdist demo`: tanh 20-8-1, 4,000 queries, 20 students of width 32 — exact width 8, all < 1e-6."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "ecdist.cli", "demo", "--out", str(out)], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "EXACT" in proc.stdout
    result = ecdist.load(out)
    assert result.layer_sizes == [8]
    assert result.comparison.layer_sizes == result.comparison.teacher_sizes == [8]
    assert max(result.comparison.max_weight_distance) < 1e-6
    assert (out / "recovery.png").stat().st_size > 0
    assert (out / "layer_1_clusters.parquet").exists()


def test_fallback_to_the_authors_cut_when_the_stable_rule_is_not_exact():
    """tanh 5-4-1 (low d_in), students stopped after 4 LM iterations: one teacher neuron's copies
    are too loose for the stable rule; the authors' generous cut includes it, and the exact-fit
    pruning removes that cut's extras. (With Levenberg damping, 300 iterations make every copy
    tight enough for the stable rule here; the early stop stands in for students that stall.)"""
    teacher = ecdist.teachers.random_mlp([5, 4, 1], "tanh", seed=7)
    X = ecdist.queries.gaussian(1000, 5, seed=17)
    config = ecdist.Config(activation="tanh", student_widths=[16], n_students=10, seed=1, fallback=False, threads=1,
                           lm_max_iter=4)
    stable_only = ecdist.recover(teacher, X, config)
    assert stable_only.final_rel_mse > 1e-16  # the stable rule alone did not reach an exact fit
    assert stable_only.layers[0].rule == "stable"

    with_fallback = ecdist.recluster(stable_only, teacher, X, fallback=True)
    report = ecdist.compare(with_fallback.network, teacher, "tanh")
    assert with_fallback.layers[0].rule == "reference"
    assert with_fallback.layer_sizes == [4]
    assert max(report.max_weight_distance) < 1e-6
    assert with_fallback.layers[0].clusters.num_rows > 4  # the extras of the generous cut were pruned


@pytest.fixture(scope="module")
def one_exact_student():
    """A tanh 8-4-1 recovery, the copies of one teacher neuron outside student 0, and a function
    that gives those students' tables the losses asked for (student 0 alone holds every neuron)."""
    teacher = ecdist.teachers.random_mlp([8, 4, 1], "tanh", seed=3)
    X = ecdist.queries.gaussian(1000, 8, seed=5)
    config = ecdist.Config(activation="tanh", student_widths=[8], n_students=6, seed=2, threads=1)
    trained = ecdist.recover(teacher, X, config)
    assert trained.layer_sizes == [4] and trained.final_rel_mse < 1e-16

    layer = trained.layers[0]
    picked = layer.clusters.column("cluster").to_pylist()[layer.clusters.column("neuron").to_pylist().index(0)]
    labels, sids = np.asarray(layer.neurons.column("cluster")), np.asarray(layer.neurons.column("student"))
    gone = (labels == picked) & (sids != 0)
    assert gone.sum() >= 2  # that neuron had copies beyond student 0's

    def with_losses(losses: dict[int, float], one_neuron: bool = False) -> ecdist.Recovery:
        """one_neuron: the other students keep only their first neuron (alone, none can fit)."""
        students = trained.students.to_pydict()
        students["rel_loss"] = [losses.get(s, loss) for s, loss in zip(students["student"], students["rel_loss"])]
        keep = ~gone
        if one_neuron:
            keep &= (sids == 0) | (np.asarray(layer.neurons.column("neuron")) == 0)
        return dataclasses.replace(
            trained,
            layers=[dataclasses.replace(layer, neurons=layer.neurons.filter(pa.array(keep)))],
            students=pa.table(students, schema=trained.students.schema),
        )

    return teacher, X, with_losses


def test_fallback_to_an_exact_student_when_no_rule_fits(one_exact_student, tmp_path, capsys):
    """Only student 0 reached the teacher's basin: the others lack the copies of one teacher
    neuron and stalled (rel_loss 1e-6), so no cluster of that neuron spans ⌊γN⌋ students and
    neither rule's neurons fit. Pruning the exact student alone gives the teacher's width
    and weights (digits ReLU 64-16-10 is this case for real: 2 or 3 of 10 students exact)."""
    teacher, X, with_losses = one_exact_student
    stalled = with_losses({s: 1e-6 for s in range(1, 6)})

    without = ecdist.recluster(stalled, teacher, X, fallback=False)
    assert without.final_rel_mse > 1e-6 and without.layer_sizes == [3]
    with_fallback = ecdist.recluster(stalled, teacher, X, fallback=True)
    assert with_fallback.layers[0].rule == "student"
    assert with_fallback.layer_sizes == [4] and with_fallback.final_rel_mse < 1e-16
    assert max(ecdist.compare(with_fallback.network, teacher, "tanh").max_weight_distance) < 1e-6
    table = with_fallback.layers[0].clusters
    assert set(table.column("source_student").to_pylist()) == {0}
    assert table.num_rows == 8 and sum(n >= 0 for n in table.column("neuron").to_pylist()) == 4  # 4 pruned
    # the neuron table keeps the first clustering's negligible-row marks
    assert with_fallback.layers[0].neurons.column("dropped").equals(without.layers[0].neurons.column("dropped"))

    again = ecdist.load(with_fallback.save(tmp_path / "result"))
    assert again.layers[0].rule == "student" and again.layer_sizes == [4]
    _print_result(again)  # what `ecdist recover` prints under its table
    assert "layer 1: no clustering rule fit exactly; one exact student's neurons, pruned" in capsys.readouterr().out
    # the figure of a black-box run (no teacher weights to compare with) plots the kept neurons only
    assert students_per_neuron(again.layers[0]).tolist() == [1, 1, 1, 1]
    assert plot_recovery(dataclasses.replace(again, comparison=None), tmp_path / "fig.png").stat().st_size > 0


def test_a_student_layer_round_trips_through_its_stage_checkpoint(tmp_path):
    """A resumed run reads a finished last layer from ``checkpoints/layer_N.npz``: a layer made by
    the exact-student fallback must come back as itself (rule, backend, the first clustering's
    dropped marks, the one-member clusters, the fit), not be clustered again."""
    rng = np.random.default_rng(0)
    vectors, sids = rng.standard_normal((12, 5)), np.repeat([0, 1, 2], 4)
    clustered = cluster_layer(vectors, sids, 0.7, n_students=3, weights=np.r_[np.ones(11), 1e-9])
    clusters, col = _student_candidates(vectors, sids, 1, clustered)
    fit = _Attempt(clusters, col, 1e-30, (col.vectors[:2], np.ones((1, 2)), np.zeros(1), None), np.array([0, 2]))
    (tmp_path / "run").mkdir()
    run = ecdist.storage.RunFolder(tmp_path / "run")
    run.save_stage(1, _to_stage(clusters, col, fit))
    back, col_back, arrays = _stage(run, 1, last=True)
    assert (back.rule, back.backend, back.min_students) == ("student", clustered.backend, 1)
    assert back.dropped.tolist() == clustered.dropped.tolist() and back.dropped[-1]  # the negligible row
    assert back.labels.tolist() == [-1] * 4 + [0, 1, 2, 3] + [-1] * 4
    assert col_back.row.tolist() == [4, 5, 6, 7] and np.array_equal(col_back.vectors, vectors[4:8])
    assert arrays["final"] == 1e-30 and arrays["kept"].tolist() == [0, 2]


@pytest.mark.parametrize("rank", [3, 4])
def test_the_fallback_tries_the_three_best_exact_students(one_exact_student, rank):
    """Students 1–5 claim exact losses but keep one neuron each, so pruned alone none of them
    fits; student 0, which holds every neuron, is found when it is among the 3 best-loss exact
    students and left untried (the answer stays inexact) when 3 others rank before it."""
    teacher, X, with_losses = one_exact_student
    losses = {s: 1e-30 * 10 ** (s + (s >= rank)) for s in range(1, 6)} | {0: 1e-30 * 10**rank}
    assert sorted(losses, key=losses.get).index(0) == rank - 1
    result = ecdist.recluster(with_losses(losses, one_neuron=True), teacher, X)
    if rank <= 3:
        assert result.layers[0].rule == "student" and result.layer_sizes == [4] and result.final_rel_mse < 1e-16
    else:
        assert result.layers[0].rule != "student" and result.final_rel_mse > 1e-6


@pytest.mark.parametrize("finish_lm", [True, False])
def test_adam_students_with_and_without_the_lm_finish(finish_lm):
    """The minibatch-Adam path (for students too large for LM), optionally finished by LM."""
    teacher = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
    X = ecdist.queries.gaussian(500, 10, seed=1)
    config = ecdist.Config(
        activation="tanh", student_widths=[8], n_students=8, optimizer="adam", finish_lm=finish_lm,
        max_epochs=300, threads=1,
    )
    result = ecdist.recover(teacher, X, config)
    assert result.plan["optimizer"] == "adam" and result.plan["finish_lm"] is finish_lm
    losses = np.asarray(result.students.column("rel_loss"))
    first = result.history[0]
    assert np.median(losses) < 0.5 * np.median(first)  # Adam trained the students
    if finish_lm:
        assert np.median(losses) < 1e-8  # the second-order finish reaches the precise regime
    report = ecdist.compare(result.network, teacher, "tanh")
    assert result.layer_sizes == [2] and max(report.max_weight_distance) < 1e-6
