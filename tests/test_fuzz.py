"""Property tests (hypothesis): malformed input ends in an ecdist error, never deeper (issue 8).

Every input drawn here is malformed by construction, so the API must raise an ``EcdistError``
subclass, and must do so before any training: ``pipeline._plan``, the first step after the
checks, is replaced by a tripwire that raises ``TrainingReached`` (a BaseException, so no
``except Exception`` can hide it). The CLI must exit with status 2 and one line on stderr,
no traceback. Where an input may or may not be valid (a file with one flipped byte, any
value for a Config field), the property is "a valid result or an ecdist error".
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import save as safetensors_bytes

import ecdist
from ecdist import ConfigError, EcdistError, QueryError, TeacherError, pipeline
from ecdist.activations import REGISTRY
from ecdist.cli import main
from ecdist.config import Config

D_IN = 4
TEACHER = ecdist.teachers.random_mlp([D_IN, 2, 1], "tanh", seed=0)
X_OK = ecdist.queries.gaussian(40, D_IN, seed=1)
CONFIG = Config(activation="tanh", student_widths=[8], n_students=4, seed=0, threads=1, backend="local",
                teacher_retries=0, teacher_batch=16)
# 60 examples per property keeps the module under 30 s; ECDIST_FUZZ_EXAMPLES=2000 digs deeper
FUZZ = settings(max_examples=int(os.environ.get("ECDIST_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
BAD_NUMBERS = [math.nan, math.inf, -math.inf, 1e200, -1e300]


class TrainingReached(BaseException):
    """The tripwire fired: a malformed input got through every check to the training plan."""


@contextlib.contextmanager
def tripwire() -> Iterator[None]:
    def plan(*args, **kwargs):
        raise TrainingReached

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "_plan", plan)
        yield


def _nonempty_float_array(draw, d: int = D_IN) -> np.ndarray:
    return draw(hnp.arrays(np.float64, (draw(st.integers(1, 12)), d), elements=st.floats(-10, 10)))


# ----- malformed query arrays ----------------------------------------------------------------------------
@st.composite
def bad_queries(draw) -> object:
    kind = draw(st.sampled_from(["values", "ndim", "empty", "width", "dtype", "object", "ragged", "not an array"]))
    if kind == "values":
        X = _nonempty_float_array(draw)
        idx = draw(st.lists(st.integers(0, X.size - 1), min_size=1, max_size=4))
        X.flat[idx] = draw(st.sampled_from(BAD_NUMBERS))
        return X
    if kind == "ndim":
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4).filter(lambda s: len(s) != 2))
        return draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1)))
    if kind == "empty":
        return np.zeros(draw(st.sampled_from([(0, D_IN), (5, 0), (0, 0)])))
    if kind == "width":
        return _nonempty_float_array(draw, d=draw(st.integers(1, 9).filter(lambda d: d != D_IN)))
    if kind == "dtype":
        dtype = draw(st.sampled_from(["U3", "S3", "complex128", "datetime64[s]", "timedelta64[s]"]))
        return draw(hnp.arrays(np.dtype(dtype), (draw(st.integers(1, 5)), D_IN)))
    if kind == "object":  # numbers, with at least one thing that is not a number
        X = _nonempty_float_array(draw).astype(object)
        X.flat[draw(st.integers(0, X.size - 1))] = draw(st.sampled_from([None, "1.5x", {"a": 1}, [1, 2], b"\x00"]))
        return X
    if kind == "ragged":
        return [[1.0] * D_IN, [1.0] * draw(st.integers(0, D_IN - 1))]
    return draw(st.sampled_from([None, "queries.npy", {"X": 1}, 3.0, [[]], object()]))


@FUZZ
@given(X=bad_queries())
def test_malformed_queries_fail_before_training(X):
    with tripwire(), pytest.raises(EcdistError):  # QueryError; TeacherError for a width the teacher does not take
        ecdist.recover(TEACHER, X, CONFIG)


# ----- malformed teacher answers -------------------------------------------------------------------------
@st.composite
def bad_teachers(draw) -> Callable[[np.ndarray], object]:
    kind = draw(st.sampled_from(["rows", "ndim", "dtype", "values", "no columns", "constant", "raises",
                                 "not an array", "tensor", "width changes"]))
    if kind == "rows":
        delta = draw(st.integers(-3, 3).filter(bool))
        return lambda x: np.zeros(max(len(x) + delta, 0))
    if kind == "ndim":
        extra = draw(st.sampled_from([(), (1, 1), (2, 1)]))
        return lambda x: np.ones(extra) if extra == () else np.ones((len(x), *extra))
    if kind == "dtype":
        dtype = draw(st.sampled_from(["U3", "S2", "complex64", "datetime64[D]"]))
        return lambda x: np.zeros(len(x), dtype=dtype)
    if kind == "values":
        rows = draw(st.lists(st.integers(0, 7), min_size=1, max_size=5))  # rows of each batch (the last has 8)
        bad = draw(st.sampled_from(BAD_NUMBERS))

        def answer(x):
            y = x[:, 0].copy()
            y[[r for r in rows if r < len(x)]] = bad
            return y

        return answer
    if kind == "no columns":
        return lambda x: np.zeros((len(x), 0))
    if kind == "constant":
        value = draw(st.floats(-1e6, 1e6))
        return lambda x: np.full(len(x), value)
    if kind == "raises":
        exc = draw(st.sampled_from([ValueError, KeyError, RuntimeError, ZeroDivisionError, MemoryError, OSError,
                                    IndexError, TypeError, AssertionError, NotImplementedError]))

        def raises(x):
            raise exc("the oracle failed")

        return raises
    if kind == "not an array":
        value = draw(st.sampled_from([None, "y", {"y": 1}, [None, "a"], object()]))
        return lambda x: value
    if kind == "tensor":
        shape = draw(st.sampled_from([(1,), (3, 1, 1), (0,)]))
        return lambda x: torch.ones(shape)
    widths = iter(range(1, 100))  # width changes from one batch to the next
    return lambda x: np.ones((len(x), next(widths))) * x[:, :1]


@FUZZ
@given(teacher=bad_teachers())
def test_malformed_teacher_answers_fail_before_training(teacher):
    with tripwire(), pytest.raises(TeacherError):
        ecdist.recover(teacher, X_OK, CONFIG)


# ----- Config --------------------------------------------------------------------------------------------
FIELDS = [f.name for f in dataclasses.fields(Config)]
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
    st.lists(st.integers(-3, 40), max_size=3), st.tuples(st.integers(1, 9)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.integers(-(2**63), 2**63 - 1).map(np.int64), st.floats(width=32).map(np.float32),
    st.sampled_from(list(REGISTRY) + ["float32", "auto", "faiss", "ray", "reference", "adam", math.pi / 3]),
)


@FUZZ
@given(field=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_any_config_value_is_accepted_or_refused_by_name(field, value):
    """Valid or not, the outcome is a usable config or a ConfigError that names the field."""
    try:
        config = Config(**{"activation": "tanh", "student_widths": [8], field: value})
    except ConfigError as exc:
        allowed = {field, "gamma"} if field == "n_students" else {field}
        assert str(exc).split(":")[0] in allowed, str(exc)
        return
    assert Config.from_json(config.to_json()) == config and len(config.fingerprint()) == 16


@st.composite
def bad_configs(draw) -> tuple[str, dict]:
    kind = draw(st.sampled_from(["gamma·N", "beta", "widths", "activation", "ints", "positive"]))
    if kind == "gamma·N":
        n = draw(st.integers(2, 40))
        gamma = draw(st.floats(1e-6, 1.0).filter(lambda g: math.floor(g * n + 1e-9) < 2))
        return "gamma", {"n_students": n, "gamma": gamma}
    if kind == "beta":
        beta = draw(st.floats(allow_nan=True).filter(lambda b: not 0 < b <= math.pi / 2))
        return "beta", {"beta": beta}
    if kind == "widths":
        widths = draw(st.lists(st.integers(-5, 40), min_size=0, max_size=3).filter(lambda w: not w or min(w) < 1))
        return "student_widths", {"student_widths": widths}
    if kind == "activation":
        name = draw(st.text(max_size=8).filter(lambda a: a not in REGISTRY))
        return "activation", {"activation": name}
    if kind == "ints":
        field = draw(st.sampled_from(["n_students", "seed", "batch_size", "teacher_batch", "threads", "max_epochs"]))
        return field, {field: draw(st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=3)))}
    field = draw(st.sampled_from(["lr", "min_lr", "teacher_timeout"]))
    return field, {field: draw(st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf)))}


@FUZZ
@given(case=bad_configs())
def test_malformed_config_is_refused_naming_the_field(case):
    field, kwargs = case
    with pytest.raises(ConfigError, match=f"^{field}:"):
        Config(**{"activation": "tanh", "student_widths": [8]} | kwargs)


# ----- files ---------------------------------------------------------------------------------------------
def _npy_bytes(A: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, A, allow_pickle=True)
    return buf.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD_STATE = {k: v.float() for k, v in TEACHER.state_dict().items()}
QUERY_FILES = {  # name: (suffix, bytes): valid files, and files valid in format but wrong in content
    "npy": (".npy", _npy_bytes(X_OK)),
    "npy 1-D": (".npy", _npy_bytes(np.arange(5.0))),
    "npy object": (".npy", _npy_bytes(np.array([[1.0, None]], dtype=object))),
    "npy text": (".npy", _npy_bytes(np.array([["1.0", "2"]]))),
    "npy empty": (".npy", _npy_bytes(np.zeros((0, D_IN)))),
    "parquet": (".parquet", _parquet_bytes(pa.table({f"x{i}": X_OK[:, i] for i in range(D_IN)}))),
    "parquet text": (".parquet", _parquet_bytes(pa.table({"a": [1.0, 2.0], "b": ["x", "y"]}))),
    "parquet ragged": (".parquet", _parquet_bytes(pa.table({"x": pa.array([[1.0, 2.0], [3.0]])}))),
    "parquet nulls": (".parquet", _parquet_bytes(pa.table({"a": pa.array([1, None, 3], pa.int64())}))),
    "parquet no rows": (".parquet", _parquet_bytes(pa.table({"a": pa.array([], pa.float64())}))),
    "parquet nested": (".parquet", _parquet_bytes(pa.table({"x": pa.array([[[1.0]], [[2.0]]])}))),
    "csv": (".csv", b"1,2\n3,4\n"),
}
TEACHER_FILES = {
    "pt": (".pt", _torch_bytes(GOOD_STATE)),
    "safetensors": (".safetensors", safetensors_bytes(GOOD_STATE)),
    "pt wrong shapes": (".pt", _torch_bytes({k: v.flip(0)[:-1] for k, v in GOOD_STATE.items()})),
    "pt not tensors": (".pt", _torch_bytes({"layers.0.weight": [1.0, 2.0]})),
    "pt a list": (".pt", _torch_bytes([torch.ones(2)])),
    "pt nan weights": (".pt", _torch_bytes({k: v * math.nan for k, v in GOOD_STATE.items()})),
    "pt complex": (".pt", _torch_bytes({k: v.to(torch.complex64) for k, v in GOOD_STATE.items()})),
    "pt bool": (".pt", _torch_bytes({k: v > 0 for k, v in GOOD_STATE.items()})),
    "pt nested": (".pt", _torch_bytes({"model": GOOD_STATE})),
    "safetensors empty": (".safetensors", safetensors_bytes({})),
}


@st.composite
def damaged(draw, files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    """A file from ``files``, kept as is, truncated, with bytes overwritten, or replaced by noise."""
    suffix, data = files[draw(st.sampled_from(sorted(files)))]
    how = draw(st.sampled_from(["as is", "truncated", "overwritten", "noise"]))
    if how == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif how == "overwritten":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        data = data[:at] + patch + data[at + len(patch):]
    elif how == "noise":
        data = draw(st.binary(max_size=300))
    return suffix, data


@contextlib.contextmanager
def written(suffix: str, data: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ecdist-fuzz-") as d:
        path = Path(d) / f"file{suffix}"
        path.write_bytes(data)
        yield path


@FUZZ
@given(file=damaged(QUERY_FILES))
def test_query_files_load_or_fail_with_a_query_error(file):
    with written(*file) as path:
        try:
            X = ecdist.queries.load(path)
        except QueryError:
            pass
        else:
            assert X.dtype == np.float64 and X.ndim == 2 and np.isfinite(X).all()
        if path.suffix == ".parquet":
            try:
                batches = list(ecdist.queries.iter_parquet(path, batch_rows=7))
            except QueryError:
                return
            assert all(b.dtype == np.float64 and b.ndim == 2 and len(b) <= 7 for _, b in batches)


@FUZZ
@given(file=damaged(TEACHER_FILES), arch=st.sampled_from(["4-2-1", "4-3-1", "2-4", "4-2-2-1", "x"]))
def test_teacher_files_load_or_fail_with_a_teacher_error(file, arch):
    with written(*file) as path:
        try:
            t = ecdist.teachers.load(path, arch=arch, activation="tanh")
        except TeacherError:
            return
        assert all(torch.isfinite(p).all() for p in t.parameters())


# ----- compare and cluster_neurons -----------------------------------------------------------------------
WIDTHS = st.lists(st.integers(1, 4), min_size=2, max_size=4)
ACTIVATION = st.sampled_from(sorted(REGISTRY) + ["swish", "", "TANH"])


@FUZZ
@given(net=WIDTHS, other=WIDTHS, activation=ACTIVATION, X=st.one_of(st.none(), bad_queries(), st.integers(1, 5)),
       black_box=st.booleans(), not_a_module=st.sampled_from([None, None, None, np.zeros((2, 2)), "network.pt"]))
def test_compare_gives_a_report_or_an_ecdist_error(net, other, activation, X, black_box, not_a_module):
    network = ecdist.teachers.random_mlp([D_IN, *net], "tanh", seed=0) if not_a_module is None else not_a_module
    teacher = ecdist.teachers.random_mlp([D_IN if len(other) % 2 else 3, *other], "tanh", seed=1)
    if isinstance(X, int):
        X = ecdist.queries.gaussian(6, X, seed=0)
    if black_box:
        teacher = teacher.predict
    try:
        report = ecdist.compare(network, teacher, activation, X=X)
    except EcdistError:
        return
    assert report.layer_sizes == net[:-1] and math.isfinite(report.functional_mse)


@FUZZ
@given(
    vectors=hnp.arrays(st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.bool_, "U2", "c16", "O"]),
                       hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12)),
    ids=st.one_of(hnp.arrays(st.sampled_from([np.int64, np.uint8, np.float64, "U1"]),
                             hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=12)),
                  st.lists(st.integers(0, 5), max_size=12)),
    gamma=st.one_of(st.floats(), st.sampled_from([0.5, 1.0, "0.5", None])),
    beta=st.one_of(st.floats(), st.sampled_from([math.pi / 3, None])),
    backend=st.sampled_from(["auto", "scipy", "faiss", "kmeans", None]),
    extra=st.dictionaries(st.sampled_from(["n_students", "min_separation", "weights", "drop", "rule"]),
                          st.one_of(st.none(), st.integers(-2, 20), st.floats(), st.text(max_size=3),
                                    st.sampled_from(["stable", "reference"])), max_size=2),
)
def test_cluster_neurons_gives_labels_or_an_ecdist_error(vectors, ids, gamma, beta, backend, extra):
    try:
        labels = ecdist.cluster.cluster_neurons(vectors, ids, gamma=gamma, beta=beta, backend=backend, **extra)
    except EcdistError:
        return
    assert labels.shape == (len(vectors),) and labels.dtype.kind == "i"


# ----- the CLI -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> Path:
    """A saved teacher, a result folder of a tiny recovery of it (for compare), a plain file."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    torch.save(TEACHER.state_dict(), root / "teacher.pt")
    config = CONFIG.replace(student_widths=[6], teacher_retries=2)
    ecdist.recover(TEACHER, ecdist.queries.gaussian(200, D_IN, seed=1), config).save(root / "result")
    (root / "a-file").write_text("not a folder")
    return root


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in this process: (exit status, stderr); argparse's usage errors are status 2 too."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
    return rc, err.getvalue()


def assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    # ours: one line; argparse's usage errors: usage lines, then one "error:" line
    assert lines and (len(lines) == 1 and lines[0].startswith("ecdist: error:") or "error:" in lines[-1]), err


BAD_FLAGS = {  # flag: values that must be refused (by argparse, Config or the checks before training)
    "--n-students": ["1", "3", "-3", "0", "x", "1.5", "2" * 30],
    "--gamma": ["0", "1.5", "nan", "inf", "-0.1", "abc"],
    "--beta": ["0", "2", "pi", "-1", "pi/0", "nan", "x"],
    "--seed": ["-1", "4294967296", "x"],
    "--student-widths": ["0", "-8", "x", "1", "1e3"],
    "--activation": ["swish", "", "TANH"],
    "--arch": ["4-2", "x", "4-0-1", "3-2-1", "4-2-2-1"],
    "--teacher-timeout": ["0", "-1", "x", "nan", "inf"],
    "--teacher-batch": ["0", "-1", "0.5"],
    "--teacher-retries": ["-1", "x"],
    "--gaussian": ["0", "-5", "x", "1e99"],
    "--dtype": ["float16", "float"],
    "--threads": ["-1", "100000"],
    "--lr": ["0", "-1", "inf", "nan"],
    "--device": ["tpu"],
    "--cluster-backend": ["kmeans"],
}


@pytest.mark.parametrize("flag", sorted(BAD_FLAGS))
def test_cli_recover_refuses_each_bad_flag_value(cli_files, flag, tmp_path):
    for value in BAD_FLAGS[flag]:
        args = _recover_args(cli_files, tmp_path) | {flag: value}
        with tripwire():
            assert_one_line_error(*run_cli(["recover", *_flatten(args)]))


def _recover_args(files: Path, tmp_path: Path) -> dict[str, str]:
    return {"--teacher": str(files / "teacher.pt"), "--arch": "4-2-1", "--activation": "tanh", "--gaussian": "40",
            "--student-widths": "8", "--n-students": "4", "--backend": "local", "--threads": "1",
            "--teacher-retries": "0", "--out": str(tmp_path / "out")}


def _flatten(args: dict[str, str]) -> list[str]:
    return [w for k, v in args.items() for w in (k, v)]


TEXT = st.text(st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters=":\x00"), max_size=12)


@FUZZ
@given(flag=st.sampled_from([f for f in BAD_FLAGS if f not in ("--activation", "--arch")]),
       value=TEXT.filter(lambda v: not _number(v)))
def test_cli_recover_refuses_text_where_a_number_goes(cli_files, flag, value):
    args = _recover_args(cli_files, Path(tempfile.gettempdir()) / "ecdist-fuzz-never-written") | {flag: value}
    with tripwire():
        assert_one_line_error(*run_cli(["recover", *_flatten(args)]))


def _number(text: str) -> bool:
    from ecdist.cli import angle

    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        angle(text)
        return True
    except Exception:
        return text.strip().lower() in REGISTRY or text.strip() in ("float32", "float64", "auto", "cpu", "cuda",
                                                                    "scipy", "faiss")


def cli_outcome(argv: list, command: str, api_refuses: bool) -> tuple[int, str] | None:
    """Run the CLI on a file the API refused or accepted. A refused file must end in one line and
    exit 2; an accepted one must reach training (``recover``: None) or be returned for the caller
    to judge (``compare``: its exit status and stderr)."""
    with tripwire():
        try:
            rc, err = run_cli(argv)
        except TrainingReached:
            assert command == "recover" and not api_refuses
            return None
    if api_refuses:
        assert_one_line_error(rc, err)
        return None
    return rc, err


@FUZZ
@given(file=damaged(QUERY_FILES), command=st.sampled_from(["recover", "compare"]))
def test_cli_with_a_damaged_query_file(cli_files, file, command):
    """Exit 2 with one line exactly when the API refuses the file; a valid file reaches training."""
    with written(*file) as path:
        try:
            X = ecdist.queries.load(path)
            api_refuses = X.shape[1] != D_IN
        except QueryError:
            api_refuses = True
        if command == "recover":
            args = _recover_args(cli_files, path.parent / "out")
            del args["--gaussian"]
            argv = ["recover", *_flatten(args), "--queries", path]
        else:
            argv = ["compare", cli_files / "result", "--teacher", cli_files / "teacher.pt", "--arch", "4-2-1",
                    "--queries", path]
        outcome = cli_outcome(argv, command, api_refuses)
        if outcome is not None:
            rc, err = outcome
            assert rc == 0 or (rc == 2 and "constant" in err), err  # compare ran; a 1-row file is constant


@FUZZ
@given(file=damaged(TEACHER_FILES), command=st.sampled_from(["recover", "compare"]))
def test_cli_with_a_damaged_teacher_file(cli_files, file, command):
    with written(*file) as path:
        try:
            ecdist.teachers.load(path, arch="4-2-1", activation="tanh")
            api_refuses = False
        except TeacherError:
            api_refuses = True
        if command == "recover":
            args = _recover_args(cli_files, path.parent / "out") | {"--teacher": str(path)}
            argv = ["recover", *_flatten(args)]
        else:
            argv = ["compare", cli_files / "result", "--teacher", path, "--arch", "4-2-1"]
        outcome = cli_outcome(argv, command, api_refuses)
        if outcome is not None:
            rc, err = outcome
            assert rc == 0, err


def test_cli_recover_refuses_an_output_folder_under_a_file(cli_files, tmp_path):
    args = _recover_args(cli_files, tmp_path) | {"--out": str(cli_files / "a-file" / "run")}
    with tripwire():
        rc, err = run_cli(["recover", *_flatten(args)])
    assert_one_line_error(rc, err)
    assert "is a file, not a folder" in err

