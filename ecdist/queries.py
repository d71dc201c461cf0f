"""Query sets: the inputs X on which the teacher is asked, and their standardisation.

Generators take a seed and return float64 arrays (n, d_in): synthetic ones (``gaussian``,
``uniform``) and ones built from data (``signed_noise``, ``grid_composition``,
``gaussian_like``); ``input_mask`` finds the inputs that never vary. Files are ``.npy`` or
Parquet (one numeric column per input, or one list column holding each row); ``iter_parquet``
reads a Parquet file a batch of rows at a time, for query sets larger than memory.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QueryError

# Largest |value| accepted in queries (and teacher outputs): standardisation squares the values,
# and 1e150² = 1e300 still fits a float64, whatever the scale of the data.
MAX_ABS = 1e150


def gaussian(n: int, d: int, seed: int = 0, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """n standard-normal queries in d dimensions (scaled and shifted).

    >>> gaussian(3, 2, seed=1).shape
    (3, 2)
    """
    _check_size(n, d)
    _check_seed(seed)
    _check_number("mean", mean)
    _check_number("std", std, positive=True)
    return mean + std * np.random.default_rng(seed).standard_normal((n, d))


def uniform(n: int, d: int, seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """n queries uniform in the box [low, high]^d."""
    _check_size(n, d)
    _check_seed(seed)
    _check_number("low", low)
    _check_number("high", high)
    if not high > low:
        raise QueryError(f"uniform queries need high > low, got low={low}, high={high}")
    return np.random.default_rng(seed).uniform(low, high, size=(n, d))


def load(path: str | Path) -> np.ndarray:
    """Queries from a ``.npy`` file or a Parquet table; checked by ``validate``."""
    path = _path(path)
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
    import pyarrow.parquet as pq

    return _rows(pq.read_table(path), path)


def _rows(table: Any, path: Path) -> np.ndarray:
    """(rows, d) float64 of a Parquet table or record batch: numeric columns, or one list column."""
    import pyarrow as pa

    if table.num_columns == 0:
        raise QueryError(f"query file {path} has no columns")
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


def iter_parquet(path: str | Path, batch_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, X) for consecutive batches of at most ``batch_rows`` rows of a Parquet query file.

    Each X is a validated float64 (rows, d) array with the same d throughout. Memory stays at one
    batch (plus the reader's buffer of the compressed pages it is decoding), not the whole file:
    ``pyarrow.parquet.ParquetFile.iter_batches`` decodes the file batch by batch.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _path(path)
    if not (isinstance(batch_rows, numbers.Integral) and not isinstance(batch_rows, bool) and batch_rows >= 1):
        raise QueryError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
    if not path.is_file():
        raise QueryError(f"query file {path} does not exist")
    try:
        reader = pq.ParquetFile(path)
        batches = reader.iter_batches(batch_size=int(batch_rows))
        start, d = 0, None
        for batch in batches:
            X = validate(_rows(batch, path), first_row=start)
            if d is not None and X.shape[1] != d:
                raise QueryError(f"query file {path}: rows from {start} have {X.shape[1]} inputs, earlier rows {d}")
            d = X.shape[1]
            yield start, X
            start += len(X)
    except QueryError:
        raise
    except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
        raise QueryError(f"query file {path} could not be read: {type(exc).__name__}: {exc}") from None
    if start == 0:
        raise QueryError(f"query file {path} holds no rows; give at least one query")


def save(X: np.ndarray, path: str | Path) -> Path:
    """Write queries as Parquet (one float64 column per input: x0, x1, …)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    pq.write_table(pa.table({f"x{i}": X[:, i] for i in range(X.shape[1])}), path)
    return path


def validate(X: np.ndarray, first_row: int = 0) -> np.ndarray:
    """Return X as a float64 (n, d) array with n, d ≥ 1 and finite entries of at most ``MAX_ABS``,
    else QueryError (rows are numbered from ``first_row``, for a batch of a larger set)."""
    X = as_float_array(X, "queries", QueryError)
    if X.ndim != 2:
        raise QueryError(f"queries must be a 2-D array (n_queries, d_in), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise QueryError(f"the query set is empty (shape {X.shape}); give at least one query of d_in >= 1 inputs")
    bad = bad_rows(X)
    if bad.size:
        raise QueryError(
            f"queries contain NaN or infinite values in {bad.size} rows (first: {(bad[:10] + first_row).tolist()}) "
            f"— |x| > {MAX_ABS:g} counts as infinite, since standardisation squares it; drop or rescale those rows"
        )
    return X


def as_float_array(A: Any, what: str, error: type[Exception]) -> np.ndarray:
    """A as float64, refusing text, bytes, dates and complex numbers (which numpy would cast)."""
    try:
        raw = np.asarray(A)
        if raw.dtype.kind not in "biufO":
            raise TypeError(f"{raw.dtype} values")
        return np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise error(f"{what} must be a numeric array: {exc}") from None


def bad_rows(A: np.ndarray) -> np.ndarray:
    """Indices of the rows of a 2-D float64 array with a NaN, an infinity or |value| > MAX_ABS."""
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(~(np.abs(A) <= MAX_ABS).all(axis=1))


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
        """Constant columns are found exactly (max = min): their computed std is rounding noise
        (1e-16 for a column of 0.3s), which as a scale would blow the column up to ±1."""
        const = np.ptp(A, axis=0) == 0
        mean = np.where(const, A[0], A.mean(axis=0))
        std = A.std(axis=0)
        return cls(mean, np.where(~const & (std > 0), std, 1.0))

    def __call__(self, A: np.ndarray) -> np.ndarray:
        return (A - self.mean) / self.scale


def _check_size(n: int, d: int) -> None:
    ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in (n, d))
    if not ok:
        raise QueryError(f"query generators need n >= 1 queries of d >= 1 inputs, got n={n!r}, d={d!r}")
    need, have = 8 * int(n) * int(d), physical_memory()
    if need > have:
        raise QueryError(
            f"{n} queries of {d} inputs need {need / 2**30:.3g} GiB, more than this machine's "
            f"{have / 2**30:.3g} GiB; ask for fewer queries"
        )


def _path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise QueryError(f"a query file is named by a path, got {type(path).__name__}")
    return Path(path)


def _check_seed(seed: Any) -> None:
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise QueryError(f"seed must be an int >= 0, got {seed!r}")


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and abs(value) <= MAX_ABS
    if not ok or (positive and not value > 0):
        raise QueryError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")


def physical_memory() -> int:
    """Bytes of RAM of this machine (no limit known: effectively unbounded)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**62


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


# ----- queries built from data (arXiv 2511.20312 and a Gaussian fit) ------------------------------
def signed_noise(X: np.ndarray, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """One-signed uniform noise on every row of X: (2n, d), X + U[0, s] then X + U[−s, 0].

    The follow-up paper's "MNIST ± η[0,1]" queries (Beiser, Martinelli et al., arXiv 2511.20312):
    in normalised pixel units, with the data set itself they let students match the teacher far
    beyond the data (symmetric noise does much worse). Statistics: rows 0..n−1 are X plus i.i.d.
    noise of mean +s/2, variance s²/12, each entry in [x, x + s]; rows n..2n−1 the same with
    −s/2 and [x − s, x]. Constant inputs become varying: either query the full teacher on these
    rows, or drop the masked columns (``Q[:, mask]``) and query the masked teacher.
    ``np.vstack([X, signed_noise(X)])`` is the paper's query set.

    >>> signed_noise(np.zeros((2, 3)), seed=0).shape
    (4, 3)
    """
    X = validate(X)
    if not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0):
        raise QueryError(f"scale must be a finite number > 0, got {scale!r}")
    noise = np.random.default_rng(seed).uniform(0.0, scale, size=(2,) + X.shape)
    return np.concatenate([X + noise[0], X - noise[1]])


def grid_composition(
    X: np.ndarray,
    n: int,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    grid: int | Sequence[int] = 2,
    return_sources: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """n mosaics: each row of X read as an image of ``shape``, cut into a ``grid`` of cells, and
    every cell of a query taken from a different random image, at the cell's own position.

    The follow-up paper's grid composition (3×3 crops of MNIST images): new inputs that excite
    the hidden units in combinations the data never shows. shape: None reads rows as 1-D signals
    (MNIST-1D: ``grid=4`` joins 4 segments of 10 from 4 signals); digits: ``shape=(8, 8),
    grid=2`` gives four 4×4 quadrants. Cells split an axis as evenly as possible. Statistics:
    every input keeps its marginal distribution in the data (constant inputs stay constant, so
    an ``input_mask`` of X still applies); inside a cell the data's correlations remain, across
    cells the parts are independent. return_sources: also the (n, cells) indices into X of
    each query's cells, cells in row-major order.

    >>> grid_composition(np.arange(64.0).reshape(4, 16), 3, seed=0, shape=(4, 4)).shape
    (3, 16)
    """
    X = validate(X)
    m, d = X.shape
    _check_size(n, d)
    shape = (d,) if shape is None else tuple(int(s) for s in shape)
    if math.prod(shape) != d or min(shape) < 1:
        raise QueryError(f"grid_composition: rows of {d} inputs cannot be read as images of shape {shape}")
    grid_t = (grid,) * len(shape) if isinstance(grid, (int, np.integer)) else tuple(grid)
    fits = all(isinstance(g, (int, np.integer)) and 1 <= g <= s for g, s in zip(grid_t, shape))
    if len(grid_t) != len(shape) or not fits:
        raise QueryError(
            f"grid_composition: grid {grid!r} must give 1..size cells per axis of shape {shape}, "
            f"e.g. grid=2 or grid={tuple(min(2, s) for s in shape)}"
        )
    n_cells = math.prod(grid_t)
    if n_cells < 2 or m < n_cells:
        raise QueryError(
            f"grid_composition: a grid of {n_cells} cells needs at least 2 cells and {n_cells} distinct images, "
            f"got {m}; use a finer grid or more images"
        )
    # cell of every input: per axis, cuts at ⌊i·size/g⌋
    axes = [np.searchsorted([i * s // g for i in range(1, g)], np.arange(s), side="right")
            for s, g in zip(shape, grid_t)]
    cell = np.ravel_multi_index(np.meshgrid(*axes, indexing="ij"), grid_t).reshape(-1)
    rng = np.random.default_rng(seed)
    sources = rng.integers(0, m, size=(n, n_cells))
    while True:  # redraw the rows that picked an image twice
        srt = np.sort(sources, axis=1)
        bad = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if bad.size == 0:
            break
        sources[bad] = rng.integers(0, m, size=(bad.size, n_cells))
    Q = X[sources[:, cell], np.arange(d)[None, :]]
    return (Q, sources) if return_sources else Q


def gaussian_like(X: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n Gaussian queries with X's mean and covariance: (n, d).

    Inputs shaped like the data's second-order statistics but with none of its structure: a
    control between Gaussian noise and the data itself. The covariance (ddof 1) is factored by
    eigen-decomposition, eigenvalues at rounding level (below λ_max·d·ε, as ``matrix_rank``) or
    negative set to zero, so a singular covariance (fewer rows than inputs, collinear inputs)
    is fine and the queries stay in the data's affine span; inputs constant in X are set to
    their value exactly and an ``input_mask`` of X still applies. Statistics: mean and covariance equal X's
    up to sampling error (standard error √(Σ_ii/n) for the mean of input i).

    >>> gaussian_like(np.random.default_rng(0).standard_normal((50, 3)), 4, seed=1).shape
    (4, 3)
    """
    X = validate(X)
    m, d = X.shape
    _check_size(n, d)
    if m < 2:
        raise QueryError(f"gaussian_like needs at least 2 rows of X to estimate a covariance, got {m}")
    vary = ~constant_inputs(X)
    mean = X.mean(axis=0)
    out = np.tile(X[0], (n, 1))  # constant inputs keep their exact value
    if vary.any():
        lam, V = np.linalg.eigh(np.cov(X[:, vary], rowvar=False).reshape(vary.sum(), vary.sum()))
        lam[lam <= lam.max() * len(lam) * np.finfo(np.float64).eps] = 0.0  # rounding noise, not variance
        root = V * np.sqrt(lam)  # cov = root rootᵀ
        z = np.random.default_rng(seed).standard_normal((n, len(lam)))
        out[:, vary] = mean[vary] + z @ root.T
    return out
