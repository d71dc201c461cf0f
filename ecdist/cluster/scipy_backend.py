"""Exact backend: scipy's average linkage over all pairwise Euclidean distances.

O(M²) memory and time (the authors' method); the reference the FAISS backend is tested against.
"""
from __future__ import annotations

import numpy as np


def average_linkage(vectors: np.ndarray) -> np.ndarray:
    """UPGMA dendrogram of the rows of ``vectors`` (M, D), scipy's Z format (M−1, 4)."""
    from scipy.cluster.hierarchy import linkage

    return linkage(np.asarray(vectors, dtype=np.float64), method="average", metric="euclidean")
