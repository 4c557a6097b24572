"""Kafka positions as every mfli state stores them: ``{"topic:partition": next offset}``.

The learner's checkpoint, the users store and the index each keep the offsets they reflect inside the
same atomic write as the state itself (docs/design.md, "Delivery"), as JSON with ``topic:partition``
keys. This module is the one place that spells the key, so the three stores, the chaos run that
compares them and the consumers that seek to them cannot disagree. The partition is split off at the
*last* colon: topic names may not contain one, but it costs nothing to be safe.
"""

from __future__ import annotations

from collections.abc import Mapping

from kafka import TopicPartition


def offset_key(topic: str, partition: int) -> str:
    """``"topic:partition"``, the key of one partition's offset in every stored offsets map."""
    return f"{topic}:{partition}"


def parse_offset_key(key: str) -> TopicPartition:
    """Inverse of :func:`offset_key`."""
    topic, _, partition = key.rpartition(":")
    return TopicPartition(topic, int(partition))


def offsets_to_json(offsets: Mapping[TopicPartition, int]) -> dict[str, int]:
    """Offsets by partition as the stores keep them (JSON-friendly string keys)."""
    return {offset_key(tp.topic, tp.partition): int(off) for tp, off in offsets.items()}


def offsets_from_json(offsets: Mapping[str, int]) -> dict[TopicPartition, int]:
    """Inverse of :func:`offsets_to_json` (what a consumer seeks to on restart)."""
    return {parse_offset_key(key): int(off) for key, off in offsets.items()}


def lag_of(highwater: int, position: int) -> int:
    """Records between the next one to read and the next one to be written; never negative (the
    position can briefly run ahead of a high watermark learnt from an older fetch)."""
    return max(0, highwater - position)
