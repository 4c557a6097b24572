"""Shared fixtures: one real Kafka-protocol broker per test session, isolated by unique names per test.

* ``broker`` (session): an :class:`~mfli.kafka.broker.EmbeddedBroker` (Tansu). Set ``MFLI_TEST_BOOTSTRAP`` to run
  the same tests against an external broker (e.g. Apache Kafka) instead.
* ``unique_name("events")``: a topic/group name no other test uses.
* ``kafka_settings``: :class:`~mfli.config.Settings` pointing at the broker, with this test's own topic
  and group names (events, items, DLQ, item updates; topics created with 2 partitions) and the small
  group timeouts that keep joins at about 1.5 s on Tansu (docs/design.md §Kafka and the embedded broker).
* ``kafka_env(settings)`` (fixture returning a function): the same settings as ``MFLI_*`` environment
  variables, for subprocesses.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator

import pytest

from mfli.config import Settings, load_settings
from mfli.kafka.broker import EmbeddedBroker
from mfli.kafka.clients import ensure_topics

TEST_PARTITIONS = 2
FAST_GROUP_TIMEOUTS = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500}
_counter = itertools.count()


class _External:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def alive(self) -> bool:
        return True


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker | _External]:
    external = os.environ.get("MFLI_TEST_BOOTSTRAP")
    if external:
        yield _External(external)
        return
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name(role)`` -> ``t-<test>-<n>-<role>``: valid as a topic and a group id."""
    test = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")

    def make(role: str) -> str:
        return f"t-{test}-{os.getpid()}-{next(_counter)}-{role}"

    return make


def make_kafka_settings(bootstrap: str, name: Callable[[str], str], **kafka_overrides: object) -> Settings:
    """Settings for one isolated test: own topics and groups, fast group timeouts, topics pre-created."""
    kafka = dict(
        bootstrap_servers=bootstrap, partitions=TEST_PARTITIONS,
        events_topic=name("events"), items_topic=name("items"), dlq_topic=name("dlq"),
        item_updates_topic=name("item-updates"), learner_group=name("learner"), indexer_group=name("indexer"),
        index_changes_topic=name("index-changes"), user_state_topic=name("user-state"),
        **FAST_GROUP_TIMEOUTS,
    )
    kafka.update(kafka_overrides)
    settings = load_settings(kafka=kafka)
    k = settings.kafka
    ensure_topics(bootstrap, k, [k.events_topic, k.items_topic, k.dlq_topic, k.item_updates_topic])
    return settings


@pytest.fixture
def kafka_settings(broker, unique_name) -> Settings:
    return make_kafka_settings(broker.bootstrap, unique_name)


def settings_env(settings: Settings) -> dict[str, str]:
    """``os.environ`` plus ``MFLI_KAFKA__*`` variables reproducing ``settings.kafka`` in a child process."""
    env = dict(os.environ)
    for key, value in settings.kafka.model_dump().items():
        env[f"MFLI_KAFKA__{key.upper()}"] = str(value)
    return env


@pytest.fixture
def kafka_env() -> Callable[[Settings], dict[str, str]]:
    """``kafka_env(settings)``: environment for a subprocess that must see the same Kafka settings."""
    return settings_env
