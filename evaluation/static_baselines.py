"""Static (train once, score from the training period) anchors: EASE and implicit-feedback ALS.

Why these two: EASE (Steck 2019) is the strongest simple item-item model on MovieLens-sized
catalogues, and implicit ALS (Hu, Koren & Volinsky 2008) is the classic matrix factorisation a
learned index is usually compared with. Neither sees the test period, so they measure what a model
fitted once on the training period reaches. Both take the binary user x item matrix (an engagement
is a 1, repeats collapse) as dense integer rows, numpy only.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)


def binary_csr(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the binary matrix with a 1 at each (row, col); duplicate pairs collapse."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if rows.shape != cols.shape:
        raise ValueError(f"{rows.shape} rows for {cols.shape} cols")
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows or cols.min() < 0 or cols.max() >= n_cols):
        raise ValueError(f"pairs out of range for a {n_rows} x {n_cols} matrix")
    keys = np.unique(rows * n_cols + cols)
    r, c = keys // n_cols, keys % n_cols
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
    return indptr, c


def histories_csr(histories: list[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary CSR of per-user histories; rows unknown at fit time (< 0 or >= n_items) are dropped."""
    lens = np.asarray([len(h) for h in histories], dtype=np.int64)
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if len(histories) else \
        np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(histories)), lens)
    keep = (cols >= 0) & (cols < n_items)
    return binary_csr(rows[keep], cols[keep], len(histories), n_items)


def _widen(scores: np.ndarray, n_items: int | None) -> np.ndarray:
    """Pad score columns to ``n_items`` with -inf (items unknown at fit time never outrank)."""
    if n_items is None or n_items <= scores.shape[1]:
        return scores[:, :n_items] if n_items is not None else scores
    out = np.full((scores.shape[0], n_items), -np.inf, dtype=scores.dtype)
    out[:, : scores.shape[1]] = scores
    return out


def _dense_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, n_cols: int,
                dtype: type) -> np.ndarray:
    """Dense 0/1 rows of a CSR matrix; rows out of range (unknown users) stay all zero."""
    out = np.zeros((len(rows), n_cols), dtype=dtype)
    for k, r in enumerate(np.asarray(rows, dtype=np.int64).tolist()):
        if 0 <= r < len(indptr) - 1:
            out[k, indices[indptr[r]:indptr[r + 1]]] = 1
    return out


class EASE:
    """EASE: B = argmin ||X - XB||^2 + lam ||B||^2 with diag(B) = 0, in closed form.

    ``P = (X'X + lam I)^-1``, ``B = -P / diag(P)`` column-wise, ``diag(B) = 0``; a user's scores are
    ``x_u B``. Costs O(n_items^3) once and n_items^2 memory: fine up to ~10k items (pass
    ``dtype=np.float32`` there to halve the memory; the ridge keeps the system well conditioned).
    """

    def __init__(self, lam: float = 500.0, dtype: type = np.float64, chunk: int = 2048) -> None:
        self.lam = float(lam)
        self.dtype = dtype
        self.chunk = chunk
        self.B: np.ndarray | None = None

    def fit(self, user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int) -> EASE:
        t0 = time.perf_counter()
        self.n_items = int(n_items)
        self.indptr, self.indices = binary_csr(user_rows, item_rows, n_users, n_items)
        gram = np.zeros((n_items, n_items), dtype=self.dtype)
        for lo in range(0, n_users, self.chunk):  # X'X in user chunks: X itself is never dense
            x = _dense_rows(self.indptr, self.indices, np.arange(lo, min(n_users, lo + self.chunk)),
                            n_items, self.dtype)
            gram += x.T @ x
        gram[np.diag_indices(n_items)] += self.lam
        p = np.linalg.inv(gram)
        del gram
        b = p / -np.diag(p)[None, :]
        b[np.diag_indices(n_items)] = 0.0
        self.B = b.astype(self.dtype, copy=False)
        log.info("EASE fit: %d users x %d items, lam %.0f, %.1fs", n_users, n_items, self.lam,
                 time.perf_counter() - t0)
        return self

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        """(len(user_rows), n_items) float32 scores (all zero for users unknown at fit time)."""
        if self.B is None:
            raise RuntimeError("fit first")
        x = _dense_rows(self.indptr, self.indices, user_rows, self.n_items, self.dtype)
        return (x @ self.B).astype(np.float32)

    def scores_histories(self, histories: list[np.ndarray], n_items: int | None = None) -> np.ndarray:
        """Scores from each history's items (the frozen model reading a history that keeps growing
        through the test period, like frozen SASRec); columns past the fit's items score -inf."""
        if self.B is None:
            raise RuntimeError("fit first")
        ptr, idx = histories_csr(histories, self.n_items)
        x = _dense_rows(ptr, idx, np.arange(len(histories)), self.n_items, self.dtype)
        return _widen((x @ self.B).astype(np.float32), n_items)


class ALS:
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008) with binary preferences.

    Confidence ``c = 1 + alpha * r`` (r = 1 for an engagement, 0 otherwise), preference ``p = r``,
    loss ``sum c (p - x_u'y_i)^2 + reg (|x|^2 + |y|^2)``. Each half-step solves every row exactly:
    ``(Y'Y + alpha Y_u'Y_u + reg I) x_u = (1 + alpha) sum_{i in u} y_i`` - the ``Y'Y`` trick makes a
    row cost O(|u| k^2), and the k x k systems are solved in batches (one LAPACK call per chunk).
    """

    def __init__(self, factors: int = 64, alpha: float = 10.0, reg: float = 10.0, iterations: int = 15,
                 seed: int = 0, chunk: int = 1024) -> None:
        self.factors = factors
        self.alpha = float(alpha)
        self.reg = float(reg)
        self.iterations = iterations
        self.seed = seed
        self.chunk = chunk
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None

    def _solve(self, other: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """New factors for every row of a CSR side, given the other side's factors (float32)."""
        k = self.factors
        base = (other.T.astype(np.float64) @ other) + self.reg * np.eye(k)
        n = len(indptr) - 1
        out = np.empty((n, k), dtype=np.float32)
        for lo in range(0, n, self.chunk):
            hi = min(n, lo + self.chunk)
            a = np.empty((hi - lo, k, k), dtype=np.float64)
            b = np.empty((hi - lo, k), dtype=np.float64)
            for r in range(lo, hi):
                y = other[indices[indptr[r]:indptr[r + 1]]]
                a[r - lo] = y.T @ y
                b[r - lo] = y.sum(axis=0)
            a *= self.alpha
            a += base
            b *= 1.0 + self.alpha
            out[lo:hi] = np.linalg.solve(a, b[..., None])[..., 0]
        return out

    def fit(self, user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int) -> ALS:
        t0 = time.perf_counter()
        self.n_items = int(n_items)
        u_ptr, u_idx = binary_csr(user_rows, item_rows, n_users, n_items)
        i_ptr, i_idx = binary_csr(item_rows, user_rows, n_items, n_users)
        rng = np.random.default_rng(self.seed)
        scale = 1.0 / np.sqrt(self.factors)
        users = (rng.standard_normal((n_users, self.factors)) * scale).astype(np.float32)
        items = (rng.standard_normal((n_items, self.factors)) * scale).astype(np.float32)
        for it in range(self.iterations):
            users = self._solve(items, u_ptr, u_idx)
            items = self._solve(users, i_ptr, i_idx)
            log.debug("ALS iteration %d/%d (%.1fs)", it + 1, self.iterations, time.perf_counter() - t0)
        self.user_factors, self.item_factors = users, items
        log.info("ALS fit: %d users x %d items, %d factors, %d iterations, %.1fs", n_users, n_items,
                 self.factors, self.iterations, time.perf_counter() - t0)
        return self

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        """(len(user_rows), n_items) float32 scores (all zero for users unknown at fit time)."""
        if self.user_factors is None or self.item_factors is None:
            raise RuntimeError("fit first")
        rows = np.asarray(user_rows, dtype=np.int64)
        known = (rows >= 0) & (rows < len(self.user_factors))
        q = np.zeros((rows.size, self.factors), dtype=np.float32)
        q[known] = self.user_factors[rows[known]]
        return q @ self.item_factors.T

    def scores_histories(self, histories: list[np.ndarray], n_items: int | None = None) -> np.ndarray:
        """Fold-in: solve each history's user factors against the frozen item factors (the exact
        user half-step), then score; columns past the fit's items score -inf."""
        if self.item_factors is None:
            raise RuntimeError("fit first")
        ptr, idx = histories_csr(histories, self.n_items)
        q = self._solve(self.item_factors, ptr, idx)
        return _widen(q @ self.item_factors.T, n_items)
