"""Query sets: the inputs X on which the teacher is asked, and their standardisation.

Generators take a seed and return float64 arrays (n, d_in); ``input_mask`` finds the inputs
that never vary. Files are ``.npy`` or
Parquet (one numeric column per input, or one list column holding each row).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QueryError


def gaussian(n: int, d: int, seed: int = 0, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """n standard-normal queries in d dimensions (scaled and shifted).

    >>> gaussian(3, 2, seed=1).shape
    (3, 2)
    """
    _check_size(n, d)
    return mean + std * np.random.default_rng(seed).standard_normal((n, d))


def uniform(n: int, d: int, seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """n queries uniform in the box [low, high]^d."""
    _check_size(n, d)
    if not high > low:
        raise QueryError(f"uniform queries need high > low, got low={low}, high={high}")
    return np.random.default_rng(seed).uniform(low, high, size=(n, d))


def load(path: str | Path) -> np.ndarray:
    """Queries from a ``.npy`` file or a Parquet table; checked by ``validate``."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"query file {path} does not exist")
    try:
        if path.suffix == ".npy":
            X = np.load(path, allow_pickle=False)
        elif path.suffix in (".parquet", ".pq"):
            X = _parquet(path)
        else:
            raise QueryError(f"query file {path}: expected a .npy or .parquet file")
    except QueryError:
        raise
    except Exception as exc:
        raise QueryError(f"query file {path} could not be read: {type(exc).__name__}: {exc}") from None
    return validate(X)


def _parquet(path: Path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    first = table.schema.field(0).type
    if table.num_columns == 1 and (pa.types.is_list(first) or pa.types.is_fixed_size_list(first)):
        return np.asarray(table.column(0).to_pylist(), dtype=np.float64)
    cols = []
    for name in table.column_names:
        col = table.column(name)
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise QueryError(f"query file {path}: column {name!r} is {col.type}, not numeric")
        cols.append(col.to_numpy().astype(np.float64))
    return np.column_stack(cols)


def save(X: np.ndarray, path: str | Path) -> Path:
    """Write queries as Parquet (one float64 column per input: x0, x1, …)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    pq.write_table(pa.table({f"x{i}": X[:, i] for i in range(X.shape[1])}), path)
    return path


def validate(X: np.ndarray) -> np.ndarray:
    """Return X as a float64 (n, d) array with n, d ≥ 1 and finite entries, else QueryError."""
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"queries must be a numeric array: {exc}") from None
    if X.ndim != 2:
        raise QueryError(f"queries must be a 2-D array (n_queries, d_in), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise QueryError(f"the query set is empty (shape {X.shape}); give at least one query of d_in >= 1 inputs")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise QueryError(
            f"queries contain NaN or infinite values in {int(bad.sum())} rows (first: {np.flatnonzero(bad)[:10].tolist()})"
        )
    return X


@dataclass(frozen=True)
class Standardizer:
    """Affine map to zero mean, unit variance per column (constant columns keep scale 1).

    Students train on standardised queries and outputs, which makes their MSE the relative MSE
    and their conditioning independent of the data's units; ``ecdist.reconstruct`` maps the
    recovered network back to the original units exactly.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, A: np.ndarray) -> "Standardizer":
        mean = A.mean(axis=0)
        std = A.std(axis=0)
        return cls(mean, np.where(std > 0, std, 1.0))

    def __call__(self, A: np.ndarray) -> np.ndarray:
        return (A - self.mean) / self.scale


def _check_size(n: int, d: int) -> None:
    if not (isinstance(n, (int, np.integer)) and n >= 1 and isinstance(d, (int, np.integer)) and d >= 1):
        raise QueryError(f"query generators need n >= 1 queries of d >= 1 inputs, got n={n!r}, d={d!r}")


# ----- inputs that never vary ------------------------------------------------------------------
def constant_inputs(X: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """(d,) bool: True for the inputs whose values in X span at most ``tol`` (max − min).

    Such inputs (the border pixels of the digits, always 0) carry no information, and the
    first-layer weights on them are unconstrained by the queries — every student sets them
    differently, so they blur the clustering unless they are masked.

    >>> constant_inputs(np.array([[0.0, 1.0, 5.0], [0.0, 2.0, 5.0]])).tolist()
    [True, False, True]
    """
    X = validate(X)
    if not (isinstance(tol, (int, float, np.floating)) and tol >= 0):
        raise QueryError(f"tol must be a number >= 0, got {tol!r}")
    return np.ptp(X, axis=0) <= tol


def input_mask(X: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """(d,) bool: True for the inputs that vary in X, the ones recovery can work on.

    The data-driven analogue of the authors' Boruta mask (which kept 452 of MNIST's 784 pixels):
    ``teachers.masked(teacher, mask, fill)`` restricts a teacher to these inputs, and
    ``X[:, mask]`` the queries. The weights on the masked inputs are not identifiable from
    queries that hold them fixed: only their sum with the bias, Σ w_i·fill_i + b, is.

    >>> input_mask(np.array([[0.0, 1.0, 5.0], [0.0, 2.0, 5.0]])).tolist()
    [False, True, False]
    """
    return ~constant_inputs(X, tol)

