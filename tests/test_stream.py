"""Query sets larger than memory: ``queries.iter_parquet`` and ``teachers.label_parquet`` (issue 8).

The memory test measures, rather than times: Arrow's allocations go through a proxy pool
installed as the default (its peak is the reader's and writer's), numpy's through tracemalloc.
A file eight times larger must not raise the peak.
"""
from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ecdist
from ecdist import QueryError, TeacherError

D_IN = 8


def write_queries(path: Path, n: int, row_group: int = 10_000, seed: int = 0) -> np.ndarray:
    """n Gaussian queries as Parquet, written a row group at a time; returns the first 1,000 rows."""
    rng = np.random.default_rng(seed)
    writer, head = None, None
    for s in range(0, n, row_group):
        X = rng.standard_normal((min(row_group, n - s), D_IN))
        head = X[:1000] if head is None else head
        table = pa.table({f"x{i}": X[:, i] for i in range(D_IN)})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return head


def teacher() -> ecdist.teachers.MLP:
    return ecdist.teachers.random_mlp([D_IN, 3, 2], "tanh", seed=0)


def test_iter_parquet_reads_in_order_in_batches(tmp_path):
    X = ecdist.queries.gaussian(250, 3, seed=1)
    ecdist.queries.save(X, tmp_path / "X.parquet")
    batches = list(ecdist.queries.iter_parquet(tmp_path / "X.parquet", batch_rows=64))
    assert [s for s, _ in batches] == [0, 64, 128, 192] and [len(b) for _, b in batches] == [64, 64, 64, 58]
    np.testing.assert_array_equal(np.vstack([b for _, b in batches]), X)


def test_iter_parquet_names_the_bad_row_in_the_whole_file(tmp_path):
    X = ecdist.queries.gaussian(100, 2, seed=1)
    X[70, 1] = np.nan
    ecdist.queries.save(X, tmp_path / "X.parquet")
    with pytest.raises(QueryError, match=r"first: \[70\]"):
        list(ecdist.queries.iter_parquet(tmp_path / "X.parquet", batch_rows=32))


@pytest.mark.parametrize("batch_rows", [0, -1, 2.5, "64", True])
def test_iter_parquet_batch_rows_must_be_a_positive_int(tmp_path, batch_rows):
    ecdist.queries.save(np.ones((3, 2)), tmp_path / "X.parquet")
    with pytest.raises(QueryError, match="batch_rows"):
        next(ecdist.queries.iter_parquet(tmp_path / "X.parquet", batch_rows=batch_rows))


def test_label_parquet_equals_query(tmp_path):
    write_queries(tmp_path / "X.parquet", 2500, row_group=700)
    X = ecdist.queries.load(tmp_path / "X.parquet")
    seen = []

    def black_box(x):
        seen.append(len(x))
        return teacher().predict(x)

    out = ecdist.teachers.label_parquet(black_box, tmp_path / "X.parquet", tmp_path / "Y.parquet", batch_rows=512)
    Y = pq.read_table(out)
    assert Y.column_names == ["y0", "y1"] and max(seen) <= 512 and sum(seen) == 2500
    # the same rows in the same batches: a GEMM's rounding may depend on how many rows it gets
    # (it does on some CPUs), so the whole X at once need not match to the last bit
    batches = np.split(X, np.cumsum(seen)[:-1])
    expected = np.vstack([ecdist.teachers.query(teacher(), b) for b in batches])
    np.testing.assert_array_equal(np.column_stack([Y["y0"], Y["y1"]]), expected)


def test_label_parquet_leaves_no_file_when_a_row_is_bad(tmp_path):
    write_queries(tmp_path / "X.parquet", 300, row_group=100)

    X = ecdist.queries.load(tmp_path / "X.parquet")

    def nan_at_row_250(x):
        y = x[:, 0].copy()
        y[(x == X[250]).all(axis=1)] = np.nan
        return y

    with pytest.raises(TeacherError, match=r"1 of 300 queries \(first rows: \[250\]"):
        ecdist.teachers.label_parquet(nan_at_row_250, tmp_path / "X.parquet", tmp_path / "Y.parquet", batch_rows=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.parquet"]  # neither Y nor its temporary file


def test_label_parquet_checks_the_teacher_and_the_file(tmp_path):
    write_queries(tmp_path / "X.parquet", 50)
    with pytest.raises(TeacherError, match="takes 3 inputs but the queries have 8"):
        ecdist.teachers.label_parquet(ecdist.teachers.random_mlp([3, 2, 1]), tmp_path / "X.parquet", tmp_path / "Y")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(QueryError, match="could not be read"):
        ecdist.teachers.label_parquet(teacher(), tmp_path / "bad.parquet", tmp_path / "Y")


def peak_bytes(run: Callable[[], object]) -> int:
    """Peak of Arrow's allocations (a proxy pool as the default) plus numpy's (tracemalloc) during ``run``."""
    pool, before = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        run()
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(before)
    return pool.max_memory() + numpy_peak


def test_label_parquet_memory_is_bounded_by_the_batch_not_the_file(tmp_path):
    """Files of 20,000 and 160,000 rows (1.3 and 10 MB of float64), 10,000-row groups, batches of 2,048 rows."""
    peaks = {}
    for n in (20_000, 160_000):
        src = tmp_path / f"X{n}.parquet"
        write_queries(src, n)
        peaks[n] = peak_bytes(lambda: ecdist.teachers.label_parquet(teacher(), src, tmp_path / f"Y{n}.parquet",
                                                                     batch_rows=2048))
        assert pq.ParquetFile(tmp_path / f"Y{n}.parquet").metadata.num_rows == n
    batch = 2048 * D_IN * 8
    assert peaks[20_000] > batch  # the measurement sees the batches at all
    assert peaks[160_000] < 1.5 * peaks[20_000], peaks  # 8 × the rows, about the same peak
    assert peaks[160_000] < 160_000 * D_IN * 8 / 4, peaks  # far below the file's data
