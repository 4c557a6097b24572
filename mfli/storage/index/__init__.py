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

* Server replicas (issue 12): :mod:`.changes` is the wire format of ``mfli.index-changes`` and the rule
  by which a copy knows it equals the primary; :mod:`.recording` captures each committed write
  transaction of the writer (and its outbox); :mod:`.copy` applies the records to a replica's copy;
  :mod:`.compare` compares two indexes byte for byte (``mfli index check --against``).

The process that feeds the writer from Kafka is ``mfli.indexer``; the one that publishes its changes is
``mfli.indexer.publish_changes`` and the one that feeds a replica's copy ``mfli.server.replica``: this
package has no Kafka in it.
"""
