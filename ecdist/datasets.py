"""Real data sets that ship with installed packages, for trained teachers and data-like queries.

Nothing is downloaded: ``digits`` is scikit-learn's ``load_digits`` (1,797 real 8×8 images,
bundled with scikit-learn) and ``mnist1d`` is generated procedurally by the ``mnist1d`` package
(never its pickled download). Both are scaled to mean 0 and standard deviation 1 over all
inputs of all samples (one scalar shift and scale, as MNIST-1D does itself and as the authors
normalise MNIST), so pixels keep their relative values and constant pixels stay constant.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace

import numpy as np

from .errors import ConfigError

DATASETS = ("digits", "mnist1d")
DIGITS_TEST_FRACTION = 0.2  # the split mnist1d uses by default (train_split 0.8)
DEFAULT_SEEDS = {"digits": 0, "mnist1d": 42}  # 42: the seed of the published MNIST-1D data set


@dataclass(frozen=True)
class Dataset:
    """A labelled data set split once into train and test.

    X_*: (n, d_in) float64; y_*: (n,) int64 labels in 0..n_classes−1; shape: how one row reads
    as an image ((8, 8) for digits, (40,) for MNIST-1D), used by ``queries.grid_composition``.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    shape: tuple[int, ...]
    n_classes: int

    @property
    def d_in(self) -> int:
        return self.X_train.shape[1]

    def subset(self, n_train: int, seed: int = 0) -> Dataset:
        """The same data set with only ``n_train`` of its training rows; the test set is unchanged.

        The rows are the first ``n_train`` of a permutation drawn from ``seed``, kept in their
        original order: the same (n_train, seed) gives the same rows, and a smaller subset under
        the same seed is part of a larger one. Why: a teacher trained on few images (more
        parameters than images) while the held-out test set stays whole for the functional MSE.

        Example:
            >>> small = load_dataset("digits").subset(300, seed=0)
            >>> small.X_train.shape, small.y_train.shape, small.X_test.shape
            ((300, 64), (300,), (359, 64))
        """
        n = len(self.X_train)
        if not isinstance(n_train, (int, np.integer)) or isinstance(n_train, bool) or not 1 <= n_train <= n:
            raise ConfigError(
                f"n_train: got {n_train!r}; expected an integer from 1 to {n} "
                f"(the {self.name} training set has {n} rows)"
            )
        _check_seed(seed)
        rows = np.sort(np.random.default_rng(int(seed)).permutation(n)[: int(n_train)])
        return replace(self, X_train=self.X_train[rows], y_train=self.y_train[rows],
                       X_test=self.X_test.copy(), y_test=self.y_test.copy())


def load_dataset(name: str, seed: int | None = None) -> Dataset:
    """The data set ``name`` (``"digits"`` or ``"mnist1d"``), split (digits) or generated (MNIST-1D) by ``seed``.

    seed: None takes the data set's default (digits 0; MNIST-1D 42, which reproduces the
    published MNIST-1D: 4,000 train and 1,000 test signals). Arrays are fresh copies.

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.X_train.shape, ds.X_test.shape, ds.shape, ds.n_classes
        ((1438, 64), (359, 64), (8, 8), 10)
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if seed is None:
        seed = DEFAULT_SEEDS[name]
    _check_seed(seed)
    Xtr, ytr, Xte, yte = _cached(name, int(seed))
    shape = (8, 8) if name == "digits" else (Xtr.shape[1],)
    return Dataset(name, Xtr.copy(), ytr.copy(), Xte.copy(), yte.copy(), shape, 10)


def _check_seed(seed: object) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")


@functools.lru_cache(maxsize=4)
def _cached(name: str, seed: int) -> tuple[np.ndarray, ...]:
    """Load or generate once per process (MNIST-1D takes seconds); callers copy."""
    return _digits(seed) if name == "digits" else _mnist1d(seed)


def _digits(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    X = (X - X.mean()) / X.std()
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = round(DIGITS_TEST_FRACTION * len(X))
    tr, te = order[n_test:], order[:n_test]
    return X[tr], y[tr], X[te], y[te]


def _mnist1d(seed: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    # make_dataset seeds the global numpy and random generators: restore them afterwards
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (
        np.asarray(data["x"], dtype=np.float64),
        np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float64),
        np.asarray(data["y_test"], dtype=np.int64),
    )
