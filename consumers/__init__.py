"""Kafka ingestion: validated, de-duplicated micro-batches with dead letters (the learner's input).

Public interface: :class:`EventStream` and :class:`Batch` (``stream.py``) and :func:`read_dead_letters`
(``dlq.py``). Kafka clients, offsets and lag are shared plumbing: :mod:`mfli.kafka`.
"""

from .dlq import DeadLetter, DeadLetterError, read_dead_letters
from .stream import Batch, EventStream

__all__ = ["Batch", "DeadLetter", "DeadLetterError", "EventStream", "read_dead_letters"]
