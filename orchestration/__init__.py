"""The roof: what runs the processes rather than being one of them.

The ``mfli`` command line (:mod:`.cli`), the one-command demo (:mod:`.demo`), the fault-injection run
(:mod:`.chaos`), the supervisor both use (:mod:`.supervisor`), the producers that feed a stream into
Kafka (:mod:`.produce`), the foreground test broker (:mod:`.broker`) and the HTML reports (:mod:`.report`).

Modules here may import the processes (``mfli.consumers``, ``mfli.learner``, ``mfli.indexer``,
``mfli.server``) and the shared floor; nothing below imports them (``tools/import_graph.py`` prints the
floors and ``tests/test_structure.py`` enforces them).
"""
