"""Kafka plumbing shared by every process: client factories and broker probes (:mod:`.clients`), the
``topic:partition`` offset keys stored next to each state (:mod:`.offsets`) and the embedded
Kafka-protocol broker for tests and the demo (:mod:`.broker`).

Nothing here knows what the records mean: the consumers validate events, the learner and the indexer
decide what to store. Importing this package does not import kafka-python; its modules do.
"""
