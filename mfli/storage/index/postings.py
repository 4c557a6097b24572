"""Bulk edits of posting lists inside one LMDB write transaction (used by the index writer).

A delta batch touches thousands of posting lists; reading each once with ``getmulti``, editing all of
them as one pair of numpy arrays and writing each once with ``putmulti`` keeps the per-list Python work
to key handling (the alternative, a read-modify-write per item, was the bottleneck of delta apply).
"""

from __future__ import annotations

import numpy as np

from mfli.storage.index import layout as L


def edit_postings(txn, post_db, facets: int, removals, additions) -> None:
    """Read every touched posting list once, apply removals and appends in bulk, write each once.

    ``removals`` / ``additions`` are per-facet ``(facet, clusters, rows)``. A row sits in exactly one
    list per facet, so a removal is a (facet, row) mark; no per-list Python work beyond key handling.
    """
    touched: dict[tuple[int, int], int] = {}
    for f, clusters, _ in removals + additions:
        for c in np.unique(clusters).tolist():
            touched.setdefault((f, c), len(touched))
    if not touched:
        return
    keys = [L.post_key(f, c) for f, c in touched]
    label_facet = np.array([f for f, _ in touched], dtype=np.int64)
    with txn.cursor(db=post_db) as cur:
        found = {bytes(k): v for k, v in cur.getmulti(keys)}
    values = [found.get(k, b"") for k in keys]
    lengths = np.array([len(v) // 8 for v in values], dtype=np.int64)
    cur_rows = np.frombuffer(b"".join(values), dtype="<i8").astype(np.int64)
    cur_label = np.repeat(np.arange(len(keys), dtype=np.int64), lengths)
    cap = int(max(cur_rows.max(initial=0), *(int(r.max(initial=0)) for _, _, r in removals + additions))) + 1
    remove = np.zeros((facets, cap), bool)
    for f, _, rows in removals:
        remove[f, rows] = True
    keep = ~remove[label_facet[cur_label], cur_rows]
    kept_label, kept_rows = cur_label[keep], cur_rows[keep]
    add_label, add_rows = [], []
    for f, clusters, rows in additions:
        if clusters.size:
            add_label.append(np.array([touched[(f, c)] for c in clusters.tolist()], dtype=np.int64))
            add_rows.append(rows)
    if add_label:
        al, ar = np.concatenate(add_label), np.concatenate(add_rows)
        order = np.argsort(al, kind="stable")
        al, ar = al[order], ar[order]
        # kept_label is already grouped ascending: insert the additions at the end of their group
        pos = np.searchsorted(kept_label, al, side="right")
        kept_rows = np.insert(kept_rows, pos, ar)
        kept_label = np.insert(kept_label, pos, al)
    counts = np.bincount(kept_label, minlength=len(keys))
    bounds = np.concatenate([[0], np.cumsum(counts)]) * 8
    buf = kept_rows.astype("<i8").tobytes()
    puts = [(k, buf[bounds[i] : bounds[i + 1]]) for i, k in enumerate(keys) if counts[i]]
    for i, k in enumerate(keys):
        if counts[i] == 0 and k in found:
            txn.delete(k, db=post_db)
    with txn.cursor(db=post_db) as cur:
        cur.putmulti(puts)
