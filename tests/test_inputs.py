"""What the user hands in: teachers (synthetic, files, black boxes), query sets, the Config, the errors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ecdist
from ecdist import ConfigError, EcdistError, QueryError, RunFolderError, TeacherError
from ecdist.config import EXECUTION_FIELDS, Config
from ecdist.teachers import parse_arch


# ----- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ConfigError, TeacherError, QueryError, RunFolderError])
def test_every_error_is_an_ecdist_error(cls):
    assert issubclass(cls, EcdistError) and issubclass(cls, Exception)
    with pytest.raises(EcdistError, match="boom"):
        raise cls("boom")


def test_value_errors_stay_value_errors():
    """Config and query errors are also ValueErrors, so generic handlers keep working."""
    assert issubclass(ConfigError, ValueError) and issubclass(QueryError, ValueError)


# ----- teachers: random_mlp --------------------------------------------------------------------------
def test_random_mlp_widths_and_dtype():
    t = ecdist.teachers.random_mlp([7, 3, 4, 2], "sigmoid", seed=0)
    assert isinstance(t, nn.Module)
    assert t.widths == [7, 3, 4, 2] and t.hidden_widths == [3, 4]
    shapes = [tuple(p.shape) for p in t.parameters()]
    assert shapes == [(3, 7), (3,), (4, 3), (4,), (2, 4), (2,)]
    assert all(p.dtype == torch.float64 for p in t.parameters())
    assert t(torch.zeros(5, 7, dtype=torch.float64)).shape == (5, 2)


def test_random_mlp_is_determined_by_its_seed():
    a = ecdist.teachers.random_mlp([6, 4, 1], "tanh", seed=3)
    b = ecdist.teachers.random_mlp([6, 4, 1], "tanh", seed=3)
    c = ecdist.teachers.random_mlp([6, 4, 1], "tanh", seed=4)
    for pa_, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa_, pb)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_random_mlp_hidden_weights_are_scaled_by_fan_in():
    t = ecdist.teachers.random_mlp([400, 50, 1], "tanh", seed=0)
    var = t.layers[0].weight.var().item()  # 20,000 entries of N(0, 1/400)
    assert 0.9 / 400 < var < 1.1 / 400


@pytest.mark.parametrize("widths", [[5, 1], [5], [5, 0, 1], [0, 3, 1]])
def test_random_mlp_needs_a_hidden_layer(widths):
    with pytest.raises(TeacherError, match="widths"):
        ecdist.teachers.random_mlp(widths, "tanh")


def test_random_mlp_unknown_activation():
    with pytest.raises(ConfigError, match="activation"):
        ecdist.teachers.random_mlp([3, 2, 1], "swish-ish")


# ----- teachers: parse_arch ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,widths",
    [("20-8-1", [20, 8, 1]), ("3-4-5-2", [3, 4, 5, 2]), ("20x8x1", [20, 8, 1]), ((10, 2, 1), [10, 2, 1])],
)
def test_parse_arch(text, widths):
    assert parse_arch(text) == widths


@pytest.mark.parametrize("text", ["20-a-1", "", "20-8", "20", "20-0-1", "20--1", "twenty"])
def test_parse_arch_errors(text):
    with pytest.raises(TeacherError, match="arch"):
        parse_arch(text)


# ----- teachers: load ---------------------------------------------------------------------------------
@pytest.fixture
def teacher():
    return ecdist.teachers.random_mlp([6, 3, 2], "tanh", seed=5)


def sequential_copy(t) -> nn.Sequential:
    seq = nn.Sequential(nn.Linear(6, 3, dtype=torch.float64), nn.Tanh(), nn.Linear(3, 2, dtype=torch.float64))
    with torch.no_grad():
        seq[0].weight.copy_(t.layers[0].weight)
        seq[0].bias.copy_(t.layers[0].bias)
        seq[2].weight.copy_(t.layers[1].weight)
        seq[2].bias.copy_(t.layers[1].bias)
    return seq


def test_load_from_every_kind_of_state_dict(teacher, tmp_path):
    X = ecdist.queries.gaussian(20, 6, seed=0)
    expected = teacher.predict(X)
    seq = sequential_copy(teacher)
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.save(teacher.state_dict(), tmp_path / "ecdist.pt")
    torch.save(seq.state_dict(), tmp_path / "sequential.pth")
    save_file(teacher.state_dict(), str(tmp_path / "ecdist.safetensors"))
    save_file(seq.state_dict(), str(tmp_path / "sequential.safetensors"))
    for name in ["ecdist.pt", "sequential.pth", "ecdist.safetensors", "sequential.safetensors"]:
        loaded = ecdist.teachers.load(tmp_path / name, arch="6-3-2", activation="tanh")
        assert loaded.widths == [6, 3, 2] and loaded.activation == "tanh"
        np.testing.assert_array_equal(loaded.predict(X), expected, err_msg=name)


def test_load_float32_state_dict(tmp_path):
    seq = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))  # float32, torch's default
    torch.save(seq.state_dict(), tmp_path / "t.pt")
    loaded = ecdist.teachers.load(str(tmp_path / "t.pt"), arch=[4, 3, 1], activation="tanh")
    X = ecdist.queries.gaussian(10, 4, seed=0)
    with torch.no_grad():
        ref = seq(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
    assert next(loaded.parameters()).dtype == torch.float64
    np.testing.assert_allclose(loaded.predict(X), ref, rtol=1e-5, atol=1e-6)


def test_load_uses_the_given_activation(teacher, tmp_path):
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    X = ecdist.queries.gaussian(10, 6, seed=0)
    loaded = ecdist.teachers.load(tmp_path / "t.pt", arch="6-3-2", activation="relu")
    W1, b1 = teacher.layers[0].weight.detach().numpy(), teacher.layers[0].bias.detach().numpy()
    W2, b2 = teacher.layers[1].weight.detach().numpy(), teacher.layers[1].bias.detach().numpy()
    np.testing.assert_allclose(loaded.predict(X), np.maximum(X @ W1.T + b1, 0) @ W2.T + b2, rtol=1e-13)


def test_load_wrong_shapes_names_the_key(tmp_path):
    torch.save(ecdist.teachers.random_mlp([6, 3, 2], "tanh").state_dict(), tmp_path / "t.pt")
    with pytest.raises(TeacherError, match=r"layers\.0\.weight.*\(3, 6\).*\(4, 6\)"):
        ecdist.teachers.load(tmp_path / "t.pt", arch="6-4-2", activation="tanh")
    with pytest.raises(TeacherError, match=r"layers\.0\.weight"):
        ecdist.teachers.load(tmp_path / "t.pt", arch="5-3-2", activation="tanh")


def test_load_wrong_bias_shape_names_the_key(tmp_path):
    state = ecdist.teachers.random_mlp([6, 3, 2], "tanh").state_dict()
    state["layers.1.bias"] = torch.zeros(5, dtype=torch.float64)
    torch.save(state, tmp_path / "t.pt")
    with pytest.raises(TeacherError, match=r"layers\.1\.bias"):
        ecdist.teachers.load(tmp_path / "t.pt", arch="6-3-2", activation="tanh")


def test_load_wrong_number_of_layers(tmp_path):
    torch.save(ecdist.teachers.random_mlp([6, 3, 2], "tanh").state_dict(), tmp_path / "t.pt")
    with pytest.raises(TeacherError, match="2 weight matrices"):
        ecdist.teachers.load(tmp_path / "t.pt", arch="6-3-3-2", activation="tanh")


def test_load_missing_file_and_bad_activation(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        ecdist.teachers.load(tmp_path / "nope.pt", arch="6-3-2", activation="tanh")
    torch.save(ecdist.teachers.random_mlp([6, 3, 2], "tanh").state_dict(), tmp_path / "t.pt")
    with pytest.raises(ConfigError, match="activation"):
        ecdist.teachers.load(tmp_path / "t.pt", arch="6-3-2", activation="tanhh")


def test_load_refuses_a_pickled_module(teacher, tmp_path):
    torch.save(teacher, tmp_path / "module.pt")  # the whole module, pickled
    with pytest.raises(TeacherError, match="state_dict"):
        ecdist.teachers.load(tmp_path / "module.pt", arch="6-3-2", activation="tanh")


def test_load_refuses_a_non_tensor_payload(tmp_path):
    torch.save({"weights": [1.0, 2.0]}, tmp_path / "t.pt")
    with pytest.raises(TeacherError, match="state dict of tensors"):
        ecdist.teachers.load(tmp_path / "t.pt", arch="6-3-2", activation="tanh")


def test_load_refuses_garbage(tmp_path):
    (tmp_path / "t.pt").write_bytes(b"not a torch file at all")
    (tmp_path / "t.safetensors").write_bytes(b"\x00\x01 not safetensors")
    for name in ["t.pt", "t.safetensors"]:
        with pytest.raises(TeacherError, match="could not be read"):
            ecdist.teachers.load(tmp_path / name, arch="6-3-2", activation="tanh")


class _Payload:
    """Unpickling this creates ``path``: a stand-in for arbitrary code in a malicious file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    # the payload is live: plain unpickling really creates its marker
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(str(live)))).close()
    assert live.exists()

    path = tmp_path / "teacher.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"layers.0.weight": _Payload(str(marker))}, protocol=2))
    else:
        torch.save({"layers.0.weight": _Payload(str(marker))}, path)
    with pytest.raises(TeacherError, match="could not be read safely"):
        ecdist.teachers.load(path, arch="6-3-2", activation="tanh")
    assert not marker.exists()


def test_load_deep_safetensors_keeps_layer_order(tmp_path):
    arch = [4] * 13  # 12 square layers: a permutation of the layers still passes the shape checks
    t = ecdist.teachers.random_mlp(arch, "tanh", seed=0)
    save_file(t.state_dict(), str(tmp_path / "deep.safetensors"))
    loaded = ecdist.teachers.load(tmp_path / "deep.safetensors", arch=arch, activation="tanh")
    X = ecdist.queries.gaussian(5, 4, seed=0)
    np.testing.assert_array_equal(loaded.predict(X), t.predict(X))


def test_load_sequential_with_six_linear_layers_from_safetensors(tmp_path):
    torch.manual_seed(0)
    mods = []
    for _ in range(5):
        mods += [nn.Linear(3, 3, dtype=torch.float64), nn.Tanh()]
    seq = nn.Sequential(*mods, nn.Linear(3, 1, dtype=torch.float64))
    save_file(seq.state_dict(), str(tmp_path / "seq.safetensors"))
    loaded = ecdist.teachers.load(tmp_path / "seq.safetensors", arch="3-3-3-3-3-3-1", activation="tanh")
    X = ecdist.queries.gaussian(5, 3, seed=0)
    with torch.no_grad():
        ref = seq(torch.as_tensor(X)).numpy()
    np.testing.assert_array_equal(loaded.predict(X), ref)


# ----- teachers: from_spec ------------------------------------------------------------------------
def test_from_spec_imports_a_function():
    fn = ecdist.teachers.from_spec("math:sqrt")
    assert fn(9.0) == 3.0


@pytest.mark.parametrize(
    "spec", ["no_colon", ":fn", "mod:", "ecdist_no_such_module_xyz:f", "math:no_such_fn", "math:pi"]
)
def test_from_spec_errors(spec):
    with pytest.raises(TeacherError, match="teacher"):
        ecdist.teachers.from_spec(spec)


# ----- teachers: query ----------------------------------------------------------------------------
def test_query_torch_module_and_callables_agree(teacher):
    X = ecdist.queries.gaussian(30, 6, seed=2)
    W1, b1 = teacher.layers[0].weight.detach().numpy(), teacher.layers[0].bias.detach().numpy()
    W2, b2 = teacher.layers[1].weight.detach().numpy(), teacher.layers[1].bias.detach().numpy()
    by_hand = np.tanh(X @ W1.T + b1) @ W2.T + b2
    Y = ecdist.teachers.query(teacher, X)
    assert Y.dtype == np.float64 and Y.shape == (30, 2)
    np.testing.assert_allclose(Y, by_hand, rtol=1e-13, atol=1e-14)
    from_numpy = ecdist.teachers.query(lambda x: np.tanh(x @ W1.T + b1) @ W2.T + b2, X)
    np.testing.assert_array_equal(from_numpy, by_hand)
    from_torch = ecdist.teachers.query(lambda x: torch.as_tensor(by_hand), X)  # a callable returning a tensor
    np.testing.assert_array_equal(from_torch, by_hand)


def test_query_accepts_one_dimensional_outputs():
    X = ecdist.queries.gaussian(12, 3, seed=0)
    Y = ecdist.teachers.query(lambda x: x.sum(axis=1), X)
    assert Y.shape == (12, 1)
    np.testing.assert_array_equal(Y[:, 0], X.sum(axis=1))


def test_query_in_batches_keeps_row_order():
    X = ecdist.queries.gaussian(25, 2, seed=0)
    calls = []

    def f(x):
        calls.append(len(x))
        return x[:, :1] * 2

    Y = ecdist.teachers.query(f, X, batch_size=10)
    assert calls == [10, 10, 5]
    np.testing.assert_array_equal(Y, X[:, :1] * 2)


@pytest.mark.parametrize("answer", [lambda x: np.zeros(len(x) - 1), lambda x: np.zeros((len(x) + 1, 2)),
                                    lambda x: np.zeros((len(x), 1, 1)), lambda x: 3.0])
def test_query_wrong_shape(answer):
    X = ecdist.queries.gaussian(10, 3, seed=0)
    with pytest.raises(TeacherError, match=r"answered 10 queries"):
        ecdist.teachers.query(answer, X)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_query_non_finite_outputs_name_the_rows(bad):
    X = ecdist.queries.gaussian(20, 3, seed=0)

    def f(x):
        y = np.ones((len(x), 2))
        y[3, 1] = bad
        y[7, 0] = bad
        return y

    with pytest.raises(TeacherError, match=r"2 of 20 queries.*\[3, 7\]"):
        ecdist.teachers.query(f, X)


def test_query_teacher_that_raises_names_the_query_range():
    X = ecdist.queries.gaussian(25, 3, seed=0)
    seen = []

    def f(x):
        seen.append(len(x))
        if len(seen) == 2:
            raise RuntimeError("oracle offline")
        return x[:, 0]

    with pytest.raises(TeacherError, match=r"RuntimeError on queries 10\.\.19: oracle offline"):
        ecdist.teachers.query(f, X, batch_size=10)


# ----- teachers: retries and timeouts ------------------------------------------------------------------
def test_query_retries_a_call_that_hangs_then_answers():
    """The first call blocks on an Event (no sleep, no race on a busy machine): after the 0.5 s
    timeout it is abandoned, the retry answers, and the abandoned call's late answer is ignored."""
    X = ecdist.queries.gaussian(25, 3, seed=0)
    release = threading.Event()
    calls = []

    def hangs_once(x):
        calls.append(len(x))
        if len(calls) == 1:
            release.wait()
            return np.full(len(x), np.nan)  # the late answer: would fail the finite check if it were used
        return x.sum(axis=1)

    try:
        Y = ecdist.teachers.query(hangs_once, X, batch_size=10, timeout=0.5, retries=2, backoff=0.0)
    finally:
        release.set()
    assert calls == [10, 10, 10, 5]  # batch 0 twice (hung, retried), then batches 1 and 2 once
    np.testing.assert_array_equal(Y[:, 0], X.sum(axis=1))


def test_query_teacher_that_keeps_hanging_names_the_batch():
    X = ecdist.queries.gaussian(25, 3, seed=0)
    release = threading.Event()

    def hangs_on_second_batch(x):
        if x[0, 0] == X[10, 0]:
            release.wait()
        return x[:, 0]

    try:
        with pytest.raises(TeacherError, match=r"did not answer queries 10\.\.19 within 0\.2 s \(tried 2 times"):
            ecdist.teachers.query(hangs_on_second_batch, X, batch_size=10, timeout=0.2, retries=1, backoff=0.0)
    finally:
        release.set()


def test_query_retries_with_exponential_backoff_then_names_the_batch_and_cause(monkeypatch):
    X = ecdist.queries.gaussian(25, 3, seed=0)
    waits, calls = [], []
    monkeypatch.setattr(ecdist.teachers.time, "sleep", waits.append)

    def offline_on_second_batch(x):
        calls.append(len(x))
        if len(calls) >= 2:
            raise ConnectionError("oracle offline")
        return x[:, 0]

    with pytest.raises(TeacherError, match=r"ConnectionError on queries 10\.\.19: oracle offline \(tried 4 times"):
        ecdist.teachers.query(offline_on_second_batch, X, batch_size=10, retries=3, backoff=0.5)
    assert waits == [0.5, 1.0, 2.0] and calls == [10] + [10] * 4


def test_query_a_flaky_teacher_succeeds_on_retry(monkeypatch):
    monkeypatch.setattr(ecdist.teachers.time, "sleep", lambda s: None)
    X = ecdist.queries.gaussian(12, 3, seed=0)
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) % 2:
            raise TimeoutError("busy")
        return 2 * x[:, 0]

    Y = ecdist.teachers.query(flaky, X, batch_size=6, retries=1)
    assert len(calls) == 4
    np.testing.assert_array_equal(Y[:, 0], 2 * X[:, 0])


def test_query_does_not_retry_a_torch_module():
    """A module's arithmetic is local and deterministic: a failure is not worth a retry."""
    calls = []

    class Broken(nn.Module):
        def forward(self, x):
            calls.append(1)
            raise RuntimeError("shape mismatch")

    with pytest.raises(TeacherError, match="RuntimeError on queries 0..4: shape mismatch"):
        ecdist.teachers.query(Broken(), np.ones((5, 2)), retries=3, backoff=0.0, timeout=1.0)
    assert calls == [1]


@pytest.mark.parametrize(
    "answer,match",
    [
        (lambda x: np.array(["a"] * len(x)), "numeric"),
        (lambda x: x[:, 0] + 1j, "numeric"),
        (lambda x: [{"y": 1}] * len(x), "numeric"),
        (lambda x: np.zeros((len(x), 0)), "no outputs"),
        (lambda x: np.full(len(x), 1e200), "infinite"),
    ],
    ids=["text", "complex", "objects", "no columns", "huge"],
)
def test_query_refuses_answers_that_are_not_finite_numbers(answer, match):
    with pytest.raises(TeacherError, match=match):
        ecdist.teachers.query(answer, ecdist.queries.gaussian(10, 3, seed=0))


def test_query_output_width_must_not_change_between_batches():
    widths = iter([1, 2])
    with pytest.raises(TeacherError, match=r"queries 5\.\.9 with 2 outputs per query, earlier queries with 1"):
        ecdist.teachers.query(lambda x: np.zeros((len(x), next(widths))), np.ones((10, 2)), batch_size=5)


def test_query_checks_the_input_width_of_a_known_teacher():
    with pytest.raises(TeacherError, match="takes 3 inputs but the queries have 4"):
        ecdist.teachers.query(ecdist.teachers.random_mlp([3, 2, 1]), np.ones((5, 4)))


def test_query_rejects_a_non_callable():
    with pytest.raises(TeacherError, match="callable"):
        ecdist.teachers.query("not a teacher", np.zeros((3, 2)))


# ----- queries -------------------------------------------------------------------------------------------
def test_gaussian_shape_dtype_and_determinism():
    X = ecdist.queries.gaussian(100, 4, seed=1)
    assert X.shape == (100, 4) and X.dtype == np.float64
    np.testing.assert_array_equal(X, ecdist.queries.gaussian(100, 4, seed=1))
    assert not np.array_equal(X, ecdist.queries.gaussian(100, 4, seed=2))
    np.testing.assert_array_equal(ecdist.queries.gaussian(100, 4, seed=1, mean=3.0, std=2.0), 3.0 + 2.0 * X)
    big = ecdist.queries.gaussian(20000, 2, seed=0)
    assert abs(big.mean()) < 0.03 and abs(big.std() - 1) < 0.03


def test_uniform_bounds_shape_and_determinism():
    X = ecdist.queries.uniform(5000, 3, seed=1, low=-2.0, high=0.5)
    assert X.shape == (5000, 3) and X.dtype == np.float64
    assert X.min() >= -2.0 and X.max() < 0.5
    assert X.min() < -1.99 and X.max() > 0.49  # fills the box
    np.testing.assert_array_equal(X, ecdist.queries.uniform(5000, 3, seed=1, low=-2.0, high=0.5))
    assert not np.array_equal(X, ecdist.queries.uniform(5000, 3, seed=2, low=-2.0, high=0.5))
    default = ecdist.queries.uniform(1000, 2, seed=0)
    assert default.min() >= -1 and default.max() < 1


@pytest.mark.parametrize("n,d", [(0, 3), (3, 0), (-1, 2), (2.5, 2)])
def test_generators_reject_bad_sizes(n, d):
    with pytest.raises(QueryError):
        ecdist.queries.gaussian(n, d)
    with pytest.raises(QueryError):
        ecdist.queries.uniform(n, d)


def test_uniform_needs_high_above_low():
    with pytest.raises(QueryError, match="high > low"):
        ecdist.queries.uniform(5, 2, low=1.0, high=1.0)


def test_load_npy(tmp_path):
    X = ecdist.queries.gaussian(30, 4, seed=0)
    np.save(tmp_path / "X.npy", X)
    np.testing.assert_array_equal(ecdist.queries.load(tmp_path / "X.npy"), X)
    np.save(tmp_path / "ints.npy", np.arange(6).reshape(3, 2))
    ints = ecdist.queries.load(str(tmp_path / "ints.npy"))
    assert ints.dtype == np.float64 and ints.tolist() == [[0, 1], [2, 3], [4, 5]]


def test_load_npy_refuses_pickled_objects(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(QueryError, match="could not be read"):
        ecdist.queries.load(tmp_path / "obj.npy")


def test_malicious_npy_queries_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "X.npy", np.array([_Payload(str(marker)), 1.0], dtype=object), allow_pickle=True)
    np.load(tmp_path / "X.npy", allow_pickle=True)[0].close()  # the payload is live: loading it runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(QueryError, match="could not be read"):
        ecdist.queries.load(tmp_path / "X.npy")
    assert not marker.exists()


def test_load_parquet_one_column_per_input(tmp_path):
    X = ecdist.queries.gaussian(30, 3, seed=0)
    pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2]}), tmp_path / "X.parquet")
    np.testing.assert_array_equal(ecdist.queries.load(tmp_path / "X.parquet"), X)
    mixed = pa.table({"i": pa.array([1, 2, 3], pa.int32()), "f": pa.array([0.5, 1.5, 2.5], pa.float32())})
    pq.write_table(mixed, tmp_path / "mixed.pq")
    np.testing.assert_array_equal(ecdist.queries.load(tmp_path / "mixed.pq"), [[1, 0.5], [2, 1.5], [3, 2.5]])


def test_queries_save_then_load(tmp_path):
    X = ecdist.queries.uniform(40, 5, seed=3)
    path = ecdist.queries.save(X, tmp_path / "q.parquet")
    assert pq.read_table(path).column_names == ["x0", "x1", "x2", "x3", "x4"]
    np.testing.assert_array_equal(ecdist.queries.load(path), X)


@pytest.mark.parametrize("list_type", [pa.list_(pa.float64()), pa.list_(pa.float64(), 3)], ids=["list", "fixed"])
def test_load_parquet_single_list_column(tmp_path, list_type):
    X = ecdist.queries.gaussian(20, 3, seed=0)
    pq.write_table(pa.table({"x": pa.array(X.tolist(), list_type)}), tmp_path / "X.parquet")
    np.testing.assert_array_equal(ecdist.queries.load(tmp_path / "X.parquet"), X)


def test_load_parquet_errors(tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0], "name": ["x", "y"]}), tmp_path / "s.parquet")
    with pytest.raises(QueryError, match="'name'.*not numeric"):
        ecdist.queries.load(tmp_path / "s.parquet")
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    with pytest.raises(QueryError):
        ecdist.queries.load(tmp_path / "ragged.parquet")
    pq.write_table(pa.table({"a": [1.0, None, 3.0]}), tmp_path / "null.parquet")
    with pytest.raises(QueryError, match="NaN"):
        ecdist.queries.load(tmp_path / "null.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(QueryError, match="could not be read"):
        ecdist.queries.load(tmp_path / "bad.parquet")


def test_load_file_errors(tmp_path):
    with pytest.raises(QueryError, match="does not exist"):
        ecdist.queries.load(tmp_path / "missing.npy")
    (tmp_path / "X.csv").write_text("1,2\n3,4\n")
    with pytest.raises(QueryError, match=r"\.npy or \.parquet"):
        ecdist.queries.load(tmp_path / "X.csv")
    np.save(tmp_path / "flat.npy", np.arange(5.0))
    with pytest.raises(QueryError, match="2-D"):
        ecdist.queries.load(tmp_path / "flat.npy")


@pytest.mark.parametrize(
    "X,match",
    [
        (np.zeros((0, 3)), "empty"),
        (np.zeros((3, 0)), "empty"),
        (np.arange(4.0), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.array([[1.0, np.nan], [0.0, 0.0], [np.inf, 1.0]]), r"NaN or infinite values in 2 rows \(first: \[0, 2\]\)"),
        ([["a", "b"]], "numeric"),
    ],
)
def test_validate_errors(X, match):
    with pytest.raises(QueryError, match=match):
        ecdist.queries.validate(X)


def test_validate_converts_to_float64():
    X = ecdist.queries.validate([[1, 2], [3, 4]])
    assert X.dtype == np.float64 and X.shape == (2, 2)


def test_standardizer():
    X = np.column_stack([np.arange(10.0), np.full(10, 7.0)])  # the second column is constant
    s = ecdist.queries.Standardizer.fit(X)
    Z = s(X)
    np.testing.assert_allclose(Z[:, 0].mean(), 0, atol=1e-15)
    np.testing.assert_allclose(Z[:, 0].std(), 1, rtol=1e-14)
    np.testing.assert_array_equal(Z[:, 1], 0.0)  # constant columns are centred, not divided by zero


def test_standardizer_finds_constant_columns_exactly():
    """np.std of 1,797 copies of 0.3 is 5.6e-17, not 0: as a scale it would turn the column into ±1
    and make the recovered weights on it 1e16 times too large (found by tests/test_fuzz.py)."""
    X = np.column_stack([np.linspace(0, 1, 1797), np.full(1797, 0.3)])
    assert X[:, 1].std() > 0
    s = ecdist.queries.Standardizer.fit(X)
    assert s.scale[1] == 1.0 and s.mean[1] == 0.3
    np.testing.assert_array_equal(s(X)[:, 1], 0.0)


# ----- Config ---------------------------------------------------------------------------------------------
def test_config_defaults():
    c = Config(activation="tanh", student_widths=[32])
    assert c.n_students == 20 and c.gamma == 0.5 and c.beta == math.pi / 3 and c.seed == 0
    assert c.dtype == "float64" and c.backend == "auto" and c.cluster_backend == "auto"
    assert c.student_widths == [32]


def test_config_takes_a_tuple_of_widths():
    c = Config(activation="tanh", student_widths=(8,))
    assert c.student_widths == [8]
    assert c == Config(activation="tanh", student_widths=[8])


def test_config_is_frozen():
    c = Config(activation="tanh", student_widths=[8])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3


BAD_VALUES = [
    ("student_widths", []), ("student_widths", [0]), ("student_widths", 8), ("student_widths", [8.0]),
    ("student_widths", [True]), ("n_students", 1), ("n_students", 4.0), ("n_students", True),
    ("gamma", 0), ("gamma", 1.5), ("gamma", float("nan")), ("gamma", "0.5"),
    ("beta", 0), ("beta", 2.0), ("beta", -0.1), ("beta", float("inf")),
    ("seed", -1), ("seed", 1.5), ("dtype", "float16"), ("dtype", torch.float64),
    ("backend", "gpu"), ("device", "tpu"), ("cluster_backend", "kmeans"), ("cluster_rule", "median"),
    ("min_separation", 0.5), ("drop", 1.0), ("drop", -0.1), ("optimizer", "sgd"),
    ("lm_max_params", 0), ("lm_max_iter", -1), ("student_tol", -1e-3), ("student_tol", 2.0),
    ("stall_window", 0), ("restarts", -1), ("restarts", 1.5), ("restart_above", -1e-6), ("restart_above", 2.0),
    ("lr", 0.0), ("lr", -1e-3), ("batch_size", 0), ("max_epochs", -5),
    ("patience", -1), ("cooldown", -1), ("min_lr", 0.0), ("finish_lm", 1), ("finish_lm", "yes"),
    ("lm_geodesic", "yes"), ("lm_geodesic", True), ("finetune_iter", -1), ("prune", None), ("fallback", "no"), ("pack_size", -1), ("threads", -2),
    ("cpus_per_pack", 0), ("gpus_per_pack", -0.5), ("actor_restarts", 1.5),
    ("seed", 2**32), ("threads", 10**6), ("teacher_batch", 0), ("teacher_timeout", 0), ("teacher_timeout", "1s"),
    ("teacher_retries", -1), ("teacher_backoff", -1.0), ("teacher_backoff", float("nan")),
    ("upper_widths", []), ("upper_widths", [0]), ("upper_widths", 8), ("upper_widths", [8.0]),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_config_constraint_violations_name_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        Config(**{"activation": "tanh", "student_widths": [8], field: value})
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_every_field_has_a_checked_bad_value():
    """The table above covers every field that has a default (activation: see below)."""
    fields = {f.name for f in dataclasses.fields(Config)} - {"activation"}
    assert fields == {f for f, _ in BAD_VALUES}


@pytest.mark.parametrize(
    "field,value",
    [("gamma", 1), ("beta", math.pi / 2), ("beta", 1e-9), ("drop", 0.0), ("student_tol", 0.0), ("min_separation", 1),
     ("lm_max_iter", 0), ("pack_size", 0), ("threads", 0), ("dtype", "float32"), ("cluster_rule", "reference"),
     ("backend", "ray"), ("gpus_per_pack", 0.25), ("actor_restarts", 0), ("seed", 2**32 - 1),
     ("teacher_timeout", None), ("teacher_timeout", 0.5), ("teacher_retries", 0), ("teacher_backoff", 0.0)],
)
def test_config_accepts_boundary_values(field, value):
    c = Config(**{"activation": "tanh", "student_widths": [8], field: value})
    assert getattr(c, field) == value


def test_config_gamma_times_n_students_below_two():
    with pytest.raises(ConfigError, match=r"^gamma:.*n_students"):
        Config(activation="tanh", student_widths=[8], n_students=8, gamma=0.05)
    with pytest.raises(ConfigError, match="gamma"):
        Config(activation="tanh", student_widths=[8], n_students=3, gamma=0.5)  # ⌊1.5⌋ = 1
    assert Config(activation="tanh", student_widths=[8], n_students=4, gamma=0.5).gamma == 0.5  # ⌊2⌋ = 2


def test_config_written_before_lm_geodesic_resumes_with_its_old_fingerprint():
    """A config.json stored before the field existed reads as "never" (what that version did) and
    hashes to the fingerprint that version wrote into run.json, so its run folder still resumes."""
    never = Config(activation="tanh", student_widths=[8, 8], lm_geodesic="never")
    stored = json.loads(never.to_json())
    del stored["lm_geodesic"], stored["upper_widths"]  # that version had neither
    old = Config.from_json(json.dumps(stored))
    assert old == never
    hashed = {k: v for k, v in stored.items() if k not in EXECUTION_FIELDS}  # what the old version hashed
    assert old.fingerprint() == hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
    assert Config(activation="tanh", student_widths=[8, 8]).lm_geodesic == "deep"  # new runs: the new default
    assert Config(activation="tanh", student_widths=[8, 8]).fingerprint() != old.fingerprint()


def test_config_written_before_upper_widths_resumes_with_its_old_fingerprint():
    """upper_widths=None (fine-tune the students' own upper layers) is what versions without the field did."""
    config = Config(activation="tanh", student_widths=[8, 8])
    stored = json.loads(config.to_json())
    del stored["upper_widths"]
    old = Config.from_json(json.dumps(stored))
    assert old == config and old.upper_widths is None
    hashed = {k: v for k, v in stored.items() if k not in EXECUTION_FIELDS}
    assert old.fingerprint() == hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]


def test_lm_geodesic_values_that_train_alike_hash_alike():
    """One hidden layer trains the same under "deep" and "never" (so a shallow run folder from before
    the field resumes with a fresh default Config); "always" and deep students differ."""
    shallow = Config(activation="tanh", student_widths=[8])
    assert shallow.fingerprint() == shallow.replace(lm_geodesic="never").fingerprint()
    assert shallow.fingerprint() != shallow.replace(lm_geodesic="always").fingerprint()
    deep = Config(activation="tanh", student_widths=[8, 8])
    assert len({deep.replace(lm_geodesic=v).fingerprint() for v in ("deep", "never", "always")}) == 3


@pytest.mark.parametrize("name", ["swish", "Tanh", "", None, 3])
def test_config_unknown_activation(name):
    with pytest.raises(ConfigError, match="activation"):
        Config(activation=name, student_widths=[8])


def test_config_every_registered_activation_is_accepted():
    from ecdist.activations import REGISTRY

    for name in REGISTRY:
        assert Config(activation=name, student_widths=[4]).activation == name


def test_config_deep_widths():
    assert Config(activation="tanh", student_widths=[8, 6, 4]).student_widths == [8, 6, 4]
    assert Config(activation="g", student_widths=(8, 6)).student_widths == [8, 6]
    with pytest.raises(ConfigError, match="^student_widths:.*linear"):  # covert linear symmetry: one layer only
        Config(activation="relu", student_widths=[8, 8])
    with pytest.raises(ConfigError, match="^student_widths:"):
        Config(activation="tanh", student_widths=[8, 0])


def test_config_json_round_trip():
    c = Config(activation="relu", student_widths=[12], n_students=9, gamma=0.7, beta=0.3, seed=4,
               dtype="float32", cluster_rule="reference", prune=False, lr=3e-4)
    text = c.to_json()
    data = json.loads(text)
    assert data["schema"] == ecdist.config.SCHEMA_VERSION and data["beta"] == 0.3
    back = Config.from_json(text)
    assert back == c and back.student_widths == [12]
    assert Config.from_dict(c.to_dict()) == c


def test_config_from_dict_unknown_field():
    d = Config(activation="tanh", student_widths=[8]).to_dict() | {"n_studnets": 5}
    with pytest.raises(ConfigError, match="n_studnets"):
        Config.from_dict(d)


def test_config_from_json_wrong_schema():
    data = json.loads(Config(activation="tanh", student_widths=[8]).to_json())
    data["schema"] = 999
    with pytest.raises(ConfigError, match="schema"):
        Config.from_json(json.dumps(data))


def test_config_from_json_validates():
    data = json.loads(Config(activation="tanh", student_widths=[8]).to_json())
    data["gamma"] = 7
    with pytest.raises(ConfigError, match="^gamma:"):
        Config.from_json(json.dumps(data))


def test_config_from_dict_missing_field():
    with pytest.raises(ConfigError, match="activation"):
        Config.from_dict({"student_widths": [8]})


def test_config_fingerprint():
    a = Config(activation="tanh", student_widths=[8], seed=1)
    b = Config(activation="tanh", student_widths=(8,), seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    assert Config.from_json(a.to_json()).fingerprint() == a.fingerprint()
    changed = {a.replace(seed=2).fingerprint(), a.replace(gamma=0.6).fingerprint(),
               a.replace(student_widths=[9]).fingerprint(), a.replace(activation="relu").fingerprint()}
    assert a.fingerprint() not in changed and len(changed) == 4
    # where a run executes is not part of its identity: a run can be resumed elsewhere
    elsewhere = a.replace(backend="ray", threads=1, pack_size=3, cpus_per_pack=2, gpus_per_pack=0.5, actor_restarts=0,
                          teacher_batch=7, teacher_timeout=30.0, teacher_retries=5, teacher_backoff=0.1)
    assert elsewhere.fingerprint() == a.fingerprint()
    assert a.replace(device="cpu").fingerprint() != a.fingerprint()  # a device changes the arithmetic


def test_config_replace_validates():
    c = Config(activation="tanh", student_widths=[8])
    assert c.replace(n_students=10).n_students == 10 and c.n_students == 20
    with pytest.raises(ConfigError, match="^n_students:"):
        c.replace(n_students=0)
    with pytest.raises(ConfigError, match="unknown config field.*n_studnets"):
        c.replace(n_studnets=10)


def test_config_numpy_scalars_become_plain_numbers():
    """Values read from numpy (np.int64 widths, np.float32 γ) pass the checks; JSON must hold them too."""
    c = Config(activation="tanh", student_widths=[np.int64(8)], n_students=np.int32(10), gamma=np.float32(0.5))
    assert type(c.student_widths[0]) is int and type(c.n_students) is int and type(c.gamma) is float
    assert Config.from_json(c.to_json()) == c and c.fingerprint() == Config(activation="tanh", student_widths=[8],
                                                                             n_students=10).fingerprint()


def test_config_from_json_needs_text():
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_json(3)
