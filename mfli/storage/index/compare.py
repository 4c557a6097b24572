"""``mfli index check --against PATH``: is a replica's index exactly the primary's?

Both indexes are read in one read transaction each, at the same index version (the stored meta
``index_version``; the checker retries until the two show the same version, since both keep moving
while the pipeline runs). Then every sub-db of the layout (:mod:`.layout`) is compared byte
for byte: item records (``rec``, ``vec``, ``row2id``, ``id2row``), posting lists (``post``), path maps
(``paths``), centroids, codebooks, the change log and every meta key (applied source offsets, codebook
versions, query encoder). A replica's own bookkeeping lives outside the layout (sub-db ``repl``) and the
primary's publishing outbox likewise, so neither is compared.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from mfli.storage.index import layout as L
from mfli.storage.index.reader import LmdbIndex


@dataclass
class CompareReport:
    index_version: int = -1
    other_version: int = -1
    offsets: dict[str, int] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)  # per sub-db, in the primary
    differences: dict[str, dict[str, int]] = field(default_factory=dict)  # sub-db -> missing/extra/different
    examples: list[str] = field(default_factory=list)
    digest: str = ""

    @property
    def ok(self) -> bool:
        return self.index_version == self.other_version and not self.differences

    def to_dict(self) -> dict:
        return {"ok": self.ok, "index_version": self.index_version, "other_version": self.other_version,
                "offsets": self.offsets, "entries": self.entries, "differences": self.differences,
                "examples": self.examples[:20], "digest": self.digest}


def _scan(txn, db) -> dict[bytes, bytes]:
    with txn.cursor(db=db) as cur:
        return {bytes(k): bytes(v) for k, v in cur.iternext(keys=True, values=True)}


def compare_indexes(primary: str | Path | LmdbIndex, other: str | Path | LmdbIndex, map_size: int = 8 << 30,
                    wait_s: float = 30.0) -> CompareReport:
    """Compare two index LMDBs at the same version (waiting up to ``wait_s`` for one). Either may be an
    open :class:`LmdbIndex` (e.g. ``writer.reader()`` in the writer's process)."""
    owned = [x for x in (primary, other) if not isinstance(x, LmdbIndex)]
    a = primary if isinstance(primary, LmdbIndex) else LmdbIndex(primary, map_size)
    b = other if isinstance(other, LmdbIndex) else LmdbIndex(other, map_size)
    report = CompareReport()
    deadline = time.monotonic() + wait_s
    try:
        while True:
            with a.view(buffers=False) as va, b.view(buffers=False) as vb:
                report.index_version, report.other_version = va.version, vb.version
                if va.version == vb.version:
                    _compare(report, a, va._txn, b, vb._txn)
                    report.offsets = va.offsets()
                    return report
            if time.monotonic() > deadline:
                report.examples.append(f"versions never matched within {wait_s:.0f} s: "
                                       f"{report.index_version} vs {report.other_version}")
                return report
            time.sleep(0.05)
    finally:
        if primary in owned:
            a.close()
        if other in owned:
            b.close()


def _compare(report: CompareReport, a: LmdbIndex, ta, b: LmdbIndex, tb) -> None:
    h = hashlib.sha256()
    for name in L.DB_NAMES:
        left, right = _scan(ta, a.db(name)), _scan(tb, b.db(name))
        report.entries[name] = len(left)
        missing = [k for k in left if k not in right]
        extra = [k for k in right if k not in left]
        different = [k for k in left if k in right and left[k] != right[k]]
        if missing or extra or different:
            report.differences[name] = {"missing": len(missing), "extra": len(extra), "different": len(different)}
            for kind, keys in (("missing", missing), ("extra", extra), ("different", different)):
                report.examples.extend(f"{name}: {kind} key {k[:40]!r}" for k in keys[:3])
        for k in sorted(left):
            h.update(name.encode() + len(k).to_bytes(4, "big") + k + len(left[k]).to_bytes(4, "big") + left[k])
    report.digest = h.hexdigest()
