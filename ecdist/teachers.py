"""Teachers: the black boxes whose weights are recovered.

A teacher is a torch module (weights readable, for ``compare``) or any callable numpy → numpy
(a true black box). ``query`` is the one place a teacher is called: in batches, under
``no_grad``, with every failure turned into a ``TeacherError`` that says what went wrong;
a black box that raises or hangs is retried with exponential backoff. ``label_parquet``
labels a query file larger than memory, batch by batch. Files are read with
``torch.load(weights_only=True)`` or safetensors: loading never runs code.
"""
from __future__ import annotations

import hashlib
import importlib
import itertools
import logging
import math
import numbers
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import nn

from . import activations
from .errors import ConfigError, QueryError, TeacherError
from .network import MLP, from_layers
from .queries import MAX_ABS, as_float_array, bad_rows, iter_parquet, physical_memory

if TYPE_CHECKING:
    from .datasets import Dataset

log = logging.getLogger(__name__)
Teacher = Union[nn.Module, Callable[[np.ndarray], Any]]


def random_mlp(widths: Sequence[int], activation: str = "tanh", seed: int = 0) -> MLP:
    """A synthetic teacher ``widths = [d_in, h_1, …, d_out]`` with N(0, 1) entries.

    Incoming weights of every hidden layer are scaled by 1/√fan_in, so pre-activations are
    O(1) on standard Gaussian inputs; biases and output weights are N(0, 1) (the calibration
    problems of ``shared/reference/calibration.md``).

    Example:
        >>> t = random_mlp([20, 8, 1], "tanh", seed=0)
        >>> t.widths
        [20, 8, 1]
    """
    widths = parse_arch(widths)
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise TeacherError(f"seed must be an int >= 0, got {seed!r}")
    need = 8 * sum((i + 1) * o for i, o in itertools.pairwise(widths))
    if need > physical_memory():
        raise TeacherError(f"widths {widths}: the weights need {need / 2**30:.3g} GiB, more than this machine has")
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for li, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        hidden = li < len(widths) - 2
        scale = 1 / math.sqrt(i) if hidden else 1.0
        weights.append(rng.standard_normal((o, i)) * scale)
        biases.append(rng.standard_normal(o))
    return from_layers(weights, biases, activation)


def fingerprint(teacher: Teacher) -> dict[str, str]:
    """What a run folder records of its teacher: its name and, for a torch module, a hash of its weights.

    Resuming with the teacher given again checks it is the run's: by the weights hash when both
    have one (no query needed), else by its answers on a few stored queries.
    """
    name = getattr(teacher, "__qualname__", None) or type(teacher).__qualname__
    module = getattr(teacher, "__module__", None) or type(teacher).__module__
    info = {"name": f"{module}.{name}"}
    if isinstance(teacher, nn.Module):
        h = hashlib.sha256()
        for key, value in sorted(teacher.state_dict().items()):
            h.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            h.update(value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        info["weights_sha256"] = h.hexdigest()
    return info


def parse_arch(arch: str | Sequence[int]) -> list[int]:
    """``"20-8-1"`` (or ``[20, 8, 1]``) → ``[20, 8, 1]``, checked: at least one hidden layer, all ≥ 1."""
    try:
        if isinstance(arch, str):
            widths = [int(p) for p in arch.replace("x", "-").split("-")]
        else:
            widths = [_int_width(a) for a in arch]
    except (TypeError, ValueError):
        raise TeacherError(
            f"arch (widths) {arch!r}: expected widths joined by '-', e.g. '20-8-1', or a list of ints"
        ) from None
    if len(widths) < 3 or min(widths) < 1:
        raise TeacherError(f"arch (widths) {arch!r}: expected d_in-h_1-...-d_out with at least one hidden layer")
    return widths


def _int_width(a: Any) -> int:
    if isinstance(a, numbers.Integral) and not isinstance(a, bool):
        return int(a)
    raise TypeError(f"{a!r} is not an int")


def load(path: str | Path, arch: str | Sequence[int], activation: str) -> MLP:
    """A teacher from a saved state dict (``.pt``/``.pth`` or ``.safetensors``) and its architecture.

    The state dict may be ecdist's own (``layers.0.weight``…) or any whose Linear weights and
    biases appear in order (``nn.Sequential``: ``0.weight``, ``2.weight``…). A pickled module is
    refused: loading it would run code from the file; save ``module.state_dict()`` instead.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TeacherError(f"a teacher file is named by a path, got {type(path).__name__}")
    path = Path(path)
    widths = parse_arch(arch)
    activations.get(activation)
    if not path.is_file():
        raise TeacherError(f"teacher file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError and others for foreign content
        raise TeacherError(
            f"teacher file {path} could not be read safely ({type(exc).__name__}: {str(exc)[:200]}); "
            "save the teacher with torch.save(module.state_dict(), path) or safetensors"
        ) from None
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"teacher file {path} does not hold a state dict of tensors")
    for k, v in state.items():
        if v.is_complex() or not (v.is_floating_point() or v.dtype in _INT_DTYPES) or not torch.isfinite(v).all():
            raise TeacherError(f"teacher file {path}: {k} holds {v.dtype} values that are not all finite real numbers")
    items = sorted(state.items(), key=lambda kv: _natural(kv[0]))  # layers.10 after layers.2
    mats = [(k, v) for k, v in items if v.ndim == 2]
    vecs = [(k, v) for k, v in items if v.ndim == 1]
    expected = list(zip(widths[:-1], widths[1:]))
    if len(mats) != len(expected) or len(vecs) != len(expected):
        raise TeacherError(
            f"teacher file {path}: found {len(mats)} weight matrices and {len(vecs)} bias vectors, "
            f"but arch {widths} needs {len(expected)} of each"
        )
    for (k, w), (i, o) in zip(mats, expected):
        if tuple(w.shape) != (o, i):
            raise TeacherError(f"teacher file {path}: {k} has shape {tuple(w.shape)}, arch {widths} needs {(o, i)}")
    for (k, b), (_, o) in zip(vecs, expected):
        if tuple(b.shape) != (o,):
            raise TeacherError(f"teacher file {path}: {k} has shape {tuple(b.shape)}, arch {widths} needs {(o,)}")
    return from_layers(
        [w.double().numpy() for _, w in mats], [b.double().numpy() for _, b in vecs], activation
    )


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _natural(key: str) -> list:
    """Sort key that orders numbered parts by number ("layers.2" before "layers.10")."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key)]


def from_spec(spec: str) -> Callable[[np.ndarray], Any]:
    """A black-box teacher named ``package.module:function`` (imported, so this runs its code)."""
    if not isinstance(spec, str):
        raise TeacherError(f"teacher: expected 'module:function', got {type(spec).__name__}")
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise TeacherError(f"teacher {spec!r}: expected 'module:function', e.g. 'mypkg.oracle:query'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as exc:  # the module's own code runs here and may fail in any way
        raise TeacherError(f"teacher {spec!r} could not be imported: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise TeacherError(f"teacher {spec!r} is not callable")
    return fn


def query(
    teacher: Teacher,
    X: np.ndarray,
    batch_size: int = 65536,
    *,
    timeout: float | None = None,
    retries: int = 0,
    backoff: float = 1.0,
) -> np.ndarray:
    """Y = teacher(X) as a float64 array (n, d_out), checked: numeric, right length, finite, 2-D.

    X: validated queries (n, d_in); the teacher is called on batches of at most ``batch_size``
    rows. A black-box callable that raises or takes longer than ``timeout`` seconds is tried
    again up to ``retries`` times, after ``backoff`` seconds, then twice as long each time (a
    remote oracle's hiccup should not cost an hours-long run). A timed-out call cannot be
    killed — Python has no way to stop a thread — so it is abandoned in its daemon thread and
    its late answer discarded; a teacher that holds resources should time itself out. Torch
    modules are called directly, without either: their arithmetic is local and deterministic.

    Raises TeacherError naming the failing batch (row range) and its cause, or the bad rows.

    Example:
        >>> query(lambda x: x.sum(axis=1), np.ones((3, 2))).tolist()
        [[2.0], [2.0], [2.0]]
    """
    _check_teacher(teacher, X.shape[1])
    answers = _Answers()
    parts = [
        answers.check(_ask(teacher, X[s : s + batch_size], s, timeout, retries, backoff), s, len(X[s : s + batch_size]))
        for s in range(0, X.shape[0], batch_size)
    ]
    answers.finish(X.shape[0])
    return np.concatenate(parts) if parts else np.zeros((0, 1))


def label_parquet(
    teacher: Teacher,
    src: str | Path,
    dst: str | Path,
    *,
    batch_rows: int = 65536,
    timeout: float | None = None,
    retries: int = 0,
    backoff: float = 1.0,
) -> Path:
    """Write Y = teacher(X) for the Parquet query file ``src`` to ``dst``, one batch at a time.

    For query sets larger than memory: X is read with ``ParquetFile.iter_batches`` and each
    batch's answers are appended to ``dst`` as they come (columns y0, y1, …, one row per row of
    ``src``, in order), so memory holds one batch of X and Y (plus the Parquet reader's buffer
    of the pages it decodes), never the file. Checks and retries are those of ``query``; the
    file appears (renamed from a temporary name) only when every row is labelled and finite.
    Recovery itself still needs X and Y in memory: Levenberg–Marquardt and the exact
    fine-tunes use every query at once, so ``recover`` takes arrays, not files.

    Example:
        >>> import tempfile, ecdist
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = ecdist.queries.save(ecdist.queries.gaussian(10, 3, seed=0), d / "X.parquet")
        >>> t = random_mlp([3, 2, 1], "tanh", seed=0)
        >>> label_parquet(t, d / "X.parquet", d / "Y.parquet", batch_rows=4).name
        'Y.parquet'
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(dst, (str, os.PathLike)):
        raise QueryError(f"the labels go to a path, got {type(dst).__name__}")
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    answers, writer, n = _Answers(), None, 0
    try:
        for start, xb in iter_parquet(src, batch_rows):
            if writer is None:
                _check_teacher(teacher, xb.shape[1])
            yb = answers.check(_ask(teacher, xb, start, timeout, retries, backoff), start, len(xb))
            table = pa.table({f"y{j}": yb[:, j] for j in range(yb.shape[1])})
            if writer is None:
                dst.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            n += len(xb)
        answers.finish(n)
        writer.close()
        os.replace(tmp, dst)
    except OSError as exc:
        raise QueryError(f"the labels could not be written to {dst}: {exc}") from None
    finally:
        if writer is not None and writer.is_open:
            writer.close()
        tmp.unlink(missing_ok=True)
    return dst


class _TimedOut(Exception):
    """A teacher call did not return within the timeout."""


def _check_teacher(teacher: Teacher, d_in: int) -> None:
    if not callable(teacher):
        raise TeacherError(f"the teacher must be a torch module or a callable, got {type(teacher).__name__}")
    if isinstance(teacher, MLP) and teacher.widths[0] != d_in:
        raise TeacherError(
            f"the teacher takes {teacher.widths[0]} inputs but the queries have {d_in}; "
            "give queries with one column per teacher input"
        )


def _ask(
    teacher: Teacher, xb: np.ndarray, start: int, timeout: float | None, retries: int, backoff: float
) -> Any:
    """The teacher's raw answer to one batch, with retries; TeacherError naming the batch if none came."""
    rows = f"queries {start}..{start + len(xb) - 1}"
    if isinstance(teacher, nn.Module):
        timeout, retries = None, 0
    cause = ""
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff * 2 ** (attempt - 1)
            log.warning("teacher call on %s failed (%s); retry %d of %d in %.3g s", rows, cause, attempt, retries, wait)
            time.sleep(wait)
        try:
            return _call(teacher, xb) if timeout is None else _call_within(teacher, xb, timeout)
        except TeacherError:
            raise
        except _TimedOut:
            cause = f"did not answer {rows} within {timeout:g} s"
        except Exception as exc:
            cause = f"raised {type(exc).__name__} on {rows}: {exc}"
    tried = f" (tried {retries + 1} times, backing off from {backoff:g} s)" if retries else ""
    raise TeacherError(f"the teacher {cause}{tried}; check the teacher, or raise teacher_timeout / teacher_retries")


def _call_within(teacher: Teacher, xb: np.ndarray, timeout: float) -> Any:
    """``_call`` in a daemon thread, waited for at most ``timeout`` seconds (then abandoned, not killed)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["out"] = _call(teacher, xb)
        except BaseException as exc:  # handed to the caller's thread, which decides
            box["exc"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="ecdist-teacher-call", daemon=True).start()
    if not done.wait(timeout):
        raise _TimedOut
    if "exc" in box:
        raise box["exc"]
    return box["out"]


def _call(teacher: Teacher, xb: np.ndarray) -> Any:
    if isinstance(teacher, nn.Module):
        p = next(iter(teacher.parameters()), None)
        dtype = p.dtype if p is not None else torch.float64
        device = p.device if p is not None else "cpu"
        with torch.no_grad():
            out = teacher(torch.as_tensor(xb, dtype=dtype, device=device))
        return out.detach().cpu().double().numpy()
    out = teacher(xb)
    return out.detach().cpu().double().numpy() if isinstance(out, torch.Tensor) else out


class _Answers:
    """Checks each batch of a teacher's answers as it comes: numeric, one row per query, the same
    number of outputs throughout; rows with non-finite outputs are counted for one final report."""

    def __init__(self) -> None:
        self.d_out: int | None = None
        self.n_bad = 0
        self.first_bad: list[int] = []

    def check(self, raw: Any, start: int, rows: int) -> np.ndarray:
        """(rows, d_out) float64 from a raw answer to queries start..start+rows−1."""
        where = f"queries {start}..{start + rows - 1}"
        yb = as_float_array(raw, f"the teacher's answer to {where}", TeacherError)
        if yb.ndim == 1:
            yb = yb[:, None]
        if yb.ndim != 2 or yb.shape[0] != rows:
            raise TeacherError(
                f"the teacher answered {rows} queries with an array of shape {yb.shape}; "
                f"expected ({rows},) or ({rows}, d_out)"
            )
        if yb.shape[1] == 0:
            raise TeacherError(f"the teacher answered {where} with no outputs (shape {yb.shape})")
        if self.d_out is not None and yb.shape[1] != self.d_out:
            raise TeacherError(
                f"the teacher answered {where} with {yb.shape[1]} outputs per query, earlier queries with {self.d_out}"
            )
        self.d_out = yb.shape[1]
        bad = bad_rows(yb)
        self.n_bad += bad.size
        self.first_bad += (bad[: 10 - len(self.first_bad)] + start).tolist()
        return yb

    def finish(self, n: int) -> None:
        if self.n_bad:
            raise TeacherError(
                f"the teacher returned NaN or infinite outputs for {self.n_bad} of {n} queries "
                f"(first rows: {self.first_bad}; |y| > {MAX_ABS:g} counts as infinite); "
                "check the teacher and the query range"
            )


class TrainedTeacher(MLP):
    """An ``MLP`` trained on a real data set, with that data set and its accuracy attached.

    It is an ordinary teacher module (``recover``, ``compare`` and ``query`` take it as is); its
    outputs are the logits. ``data`` holds the split it was trained on; ``X_train``… are
    shortcuts, ``accuracy`` is the test accuracy.
    """

    def __init__(self, widths: Sequence[int], activation: str, data: Dataset) -> None:
        super().__init__(widths, activation)
        self.data = data
        self.train_accuracy = float("nan")
        self.test_accuracy = float("nan")
        self.losses = np.zeros(0)  # mean training cross-entropy per epoch
        self.train_seconds = float("nan")

    @property
    def dataset(self) -> str:
        return self.data.name

    @property
    def X_train(self) -> np.ndarray:
        return self.data.X_train

    @property
    def y_train(self) -> np.ndarray:
        return self.data.y_train

    @property
    def X_test(self) -> np.ndarray:
        return self.data.X_test

    @property
    def y_test(self) -> np.ndarray:
        return self.data.y_test

    @property
    def accuracy(self) -> float:
        return self.test_accuracy

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Fraction of rows of X whose largest logit is the label y."""
        return float(np.mean(self.predict(X).argmax(axis=1) == np.asarray(y)))


def train_on(
    dataset: str | Dataset,
    widths: Sequence[int],
    activation: str = "tanh",
    seed: int = 0,
    *,
    epochs: int = 150,
    lr: float = 1e-2,
    batch_size: int = 128,
    weight_decay: float = 0.1,
    data_seed: int | None = None,
    n_train: int | None = None,
) -> TrainedTeacher:
    """A teacher ``widths = [d_in, h_1, …, n_classes]`` trained by cross-entropy on ``dataset``.

    dataset: ``"digits"`` (64 inputs) or ``"mnist1d"`` (40 inputs), both 10 classes, or a
    ``datasets.Dataset``; data_seed: its split/generation seed (None: the data set's default).
    n_train: train on only this many training images, ``Dataset.subset(n_train, seed)`` (the
    same rows for the same seed; None: all of them); the test set stays whole, and ``t.data``
    is the subset, so ``t.X_train`` is exactly what the teacher saw — e.g. 400 digits images
    for a 64-8-10 teacher (610 parameters) gives a teacher with more parameters than images.
    Training is float64 minibatch Adam with a cosine decay of ``lr`` to zero over ``epochs``
    and decoupled weight decay (AdamW), which keeps the weights moderate so hidden units are
    not saturated on the data — saturated units are hard to identify from queries. Weights
    start LeCun-normal (std 1/√fan_in), biases at zero; initialisation and minibatch order
    depend only on ``seed``, so the same call gives the same weights bit for bit.

    Example:
        >>> t = train_on("digits", [64, 4, 10], "tanh", seed=0, epochs=2)
        >>> t.widths, t.X_train.shape
        ([64, 4, 10], (1438, 64))
    """
    from .datasets import Dataset, load_dataset

    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_seed)
    if n_train is not None:
        data = data.subset(n_train, seed)
    widths = _check_widths(widths, data)
    activations.get(activation)
    for name, value, ok in (
        ("epochs", epochs, isinstance(epochs, (int, np.integer)) and epochs >= 1),
        ("batch_size", batch_size, isinstance(batch_size, (int, np.integer)) and batch_size >= 1),
        ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0),
        ("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0),
    ):
        if not ok:
            raise ConfigError(f"{name}: got {value!r}; expected a positive number (weight_decay may be 0)")
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) / math.sqrt(i) for i, o in itertools.pairwise(widths)]
    net = TrainedTeacher(widths, activation, data)
    with torch.no_grad():
        for lin, w in zip(net.layers, weights):
            lin.weight.copy_(torch.as_tensor(w))
            lin.bias.zero_()
    X = torch.tensor(data.X_train, dtype=torch.float64)
    y = torch.tensor(data.y_train, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(X) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    losses = np.zeros(epochs)
    t0 = time.perf_counter()
    with _one_thread():
        for epoch in range(epochs):
            order = torch.randperm(len(X), generator=gen)
            total = 0.0
            for s in range(0, len(X), batch_size):
                idx = order[s : s + batch_size]
                loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            losses[epoch] = total / len(X)
    net.train_seconds = time.perf_counter() - t0
    net.losses = losses
    net.train_accuracy = net.score(data.X_train, data.y_train)
    net.test_accuracy = net.score(data.X_test, data.y_test)
    log.info(
        "trained %s teacher %s (%s): train accuracy %.3f, test %.3f, in %.1f s",
        data.name, widths, activation, net.train_accuracy, net.test_accuracy, net.train_seconds,
    )
    return net.eval()


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small minibatches on one torch thread: with more, threading overhead (and, on shared
    cores, oversubscription) makes each step 10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_widths(widths: Sequence[int], data: Dataset) -> list[int]:
    try:
        widths = [int(w) for w in widths]
    except (TypeError, ValueError):
        raise ConfigError(f"widths: expected a list of integers, got {widths!r}") from None
    if len(widths) < 3 or min(widths) < 1:
        raise ConfigError(f"widths {widths}: need [d_in, h_1, ..., n_classes] with at least one hidden layer")
    if widths[0] != data.d_in or widths[-1] != data.n_classes:
        raise ConfigError(
            f"widths {widths}: the {data.name} data set has {data.d_in} inputs and {data.n_classes} classes, "
            f"so widths must start with {data.d_in} and end with {data.n_classes}, "
            f"e.g. {[data.d_in, *widths[1:-1], data.n_classes]}"
        )
    return widths


# ----- restricting a teacher to the inputs that vary ------------------------------------------------
def masked(teacher: Teacher, mask: np.ndarray, fill: np.ndarray) -> Teacher:
    """The teacher as a function of the kept inputs only: x[mask] ↦ teacher(x), with the other
    inputs held at ``fill``.

    mask: (d_in,) bool, True for the inputs kept (``queries.input_mask``); fill: the values of
    the masked inputs, (d_in,) (entries under the mask ignored, e.g. ``X.mean(axis=0)``) or
    (d_in − kept,). Recovery then works on the varying inputs only. For an ``MLP`` the result
    is an ``MLP`` again, exact: the first layer keeps the columns of the kept inputs and its bias
    absorbs W_masked·fill (likewise the skip path into the output bias), so ``compare`` reads
    its neurons. That absorbed bias is what queries with fixed masked inputs can identify; the
    first-layer weights on masked inputs are not identifiable and a recovered network has none.
    Any other teacher is wrapped: it is called on the rows filled back to d_in inputs.

    Example:
        >>> t = random_mlp([3, 2, 1], "tanh", seed=0)
        >>> tm = masked(t, np.array([True, False, True]), fill=np.array([0.0, 5.0, 0.0]))
        >>> tm.widths
        [2, 2, 1]
        >>> bool(np.allclose(tm.predict([[1.0, 2.0]]), t.predict([[1.0, 5.0, 2.0]])))
        True
    """
    d_in = teacher.widths[0] if isinstance(teacher, MLP) else None
    mask, fill_all = _check_mask(mask, fill, d_in)
    if not isinstance(teacher, MLP):
        return FilledTeacher(teacher, mask, fill_all)
    W = [lin.weight.detach().cpu().double().numpy() for lin in teacher.layers]
    b = [lin.bias.detach().cpu().double().numpy() for lin in teacher.layers]
    drop = ~mask
    b[0] = b[0] + W[0][:, drop] @ fill_all[drop]
    W[0] = W[0][:, mask]
    skip = None
    if teacher.skip is not None:
        S = teacher.skip.weight.detach().cpu().double().numpy()
        b[-1] = b[-1] + S[:, drop] @ fill_all[drop]
        skip = S[:, mask]
    return from_layers(W, b, teacher.activation, skip=skip)


def expand_inputs(network: MLP, mask: np.ndarray) -> MLP:
    """A network on the kept inputs (``masked``, or one recovered from it) as one on all d_in
    inputs, with zero weights from the masked ones.

    It equals the original teacher wherever the masked inputs are at their ``fill`` values,
    since ``masked`` moved their contribution into the biases.

    Example:
        >>> t = random_mlp([3, 2, 1], "tanh", seed=0)
        >>> expand_inputs(masked(t, np.array([True, False, True]), np.zeros(3)), np.array([True, False, True])).widths
        [3, 2, 1]
    """
    mask, _ = _check_mask(mask, None, None)
    if int(mask.sum()) != network.widths[0]:
        raise TeacherError(
            f"the mask keeps {int(mask.sum())} inputs but the network has {network.widths[0]}; "
            "pass the mask the network was restricted with"
        )
    W = [lin.weight.detach().cpu().double().numpy() for lin in network.layers]
    b = [lin.bias.detach().cpu().double().numpy() for lin in network.layers]
    full = np.zeros((W[0].shape[0], mask.size))
    full[:, mask] = W[0]
    skip = None
    if network.skip is not None:
        skip = np.zeros((network.widths[-1], mask.size))
        skip[:, mask] = network.skip.weight.detach().cpu().double().numpy()
    return from_layers([full, *W[1:]], b, network.activation, skip=skip)


class FilledTeacher:
    """A black-box teacher called on reduced inputs: fills the masked inputs, then asks it."""

    def __init__(self, teacher: Teacher, mask: np.ndarray, fill: np.ndarray) -> None:
        self.teacher, self.mask, self.fill = teacher, mask, fill

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != int(self.mask.sum()):
            raise TeacherError(
                f"this masked teacher takes (n, {int(self.mask.sum())}) inputs, got shape {X.shape}"
            )
        full = np.tile(self.fill, (X.shape[0], 1))
        full[:, self.mask] = X
        return query(self.teacher, full)


def _check_mask(mask: np.ndarray, fill: np.ndarray | None, d_in: int | None) -> tuple[np.ndarray, np.ndarray]:
    """mask as (d,) bool with at least one kept input; fill as (d,) float64 (zeros under the mask)."""
    m = np.asarray(mask)
    if m.ndim != 1 or m.dtype != bool:
        raise TeacherError(f"mask must be a 1-D boolean array (True: input kept), got {m.dtype} of shape {m.shape}")
    if d_in is not None and m.size != d_in:
        raise TeacherError(f"the mask has {m.size} entries but the teacher has {d_in} inputs")
    if not m.any():
        raise TeacherError("the mask keeps no input; it must keep at least one (True: input kept)")
    full = np.zeros(m.size)
    if fill is not None:
        f = np.asarray(fill, dtype=np.float64)
        n_drop = int((~m).sum())
        if f.ndim != 1 or f.size not in (m.size, n_drop):
            raise TeacherError(
                f"fill must hold a value for every input ({m.size}) or for every masked input ({n_drop}), "
                f"got shape {f.shape}"
            )
        if not np.isfinite(f).all():
            raise TeacherError("fill has NaN or infinite values")
        full[~m] = f[~m] if f.size == m.size else f
    return m, full
