"""Kafka ingestion: validated, de-duplicated micro-batches with dead letters (the learner's input).

Public interface: :class:`EventStream` and :class:`Batch` (``stream.py``), :func:`read_dead_letters`
(``dlq.py``), and the client factories in ``clients.py``.
"""

from .dlq import DeadLetter, DeadLetterError, read_dead_letters
from .stream import Batch, EventStream, lag_of

__all__ = ["Batch", "DeadLetter", "DeadLetterError", "EventStream", "lag_of", "read_dead_letters"]
