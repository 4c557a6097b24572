"""The index LMDB, owned end to end by this package: its byte layout, its single writer and its readers.

* :mod:`.layout` — the format (sub-databases, keys, record struct, meta keys). Private to this
  package: nothing outside it reads or writes index bytes (``tests/test_structure.py`` checks it).
* :mod:`.writer` — :class:`~.writer.IndexWriter`, the one writer: applies learner deltas, codebooks
  and query encoders in transactions that also hold the source offsets, and runs the full pass
  (:mod:`.full_pass`: re-encode, rebuild split/merged clusters, swap atomically). Its helpers:
  :mod:`.postings` (bulk posting-list edits), :mod:`.rows` (the index's own row numbering),
  :mod:`.columns` (the writer's in-memory per-item columns).
* :mod:`.reader` — :class:`~.reader.LmdbIndex` and :class:`~.reader.LmdbIndexView`, the public read
  API (one read transaction per view) used by the server, the checker (``mfli index check``), the
  reports and the chaos run; :mod:`.mirror` is the server's dense copy kept current from the change log.

The process that feeds the writer from Kafka is ``mfli.indexer``; this package has no Kafka in it.
"""
