"""The shared contracts: settings from the environment, wire schemas, query pooling and scoring."""

import numpy as np
import pytest
from pydantic import ValidationError

from mfli.config import load_settings
from mfli.events import InteractionEvent
from mfli.retrieval.base import pool_query, score, top_k


def test_settings_read_nested_env(monkeypatch):
    monkeypatch.setenv("MFLI_KAFKA__SESSION_TIMEOUT_MS", "3000")
    monkeypatch.setenv("MFLI_MODEL__FACETS", "1")
    settings = load_settings()
    assert settings.kafka.session_timeout_ms == 3000
    assert settings.model.facets == 1


def test_settings_reject_heartbeat_above_session(monkeypatch):
    monkeypatch.setenv("MFLI_KAFKA__SESSION_TIMEOUT_MS", "2000")
    monkeypatch.setenv("MFLI_KAFKA__HEARTBEAT_INTERVAL_MS", "2500")
    with pytest.raises(ValidationError, match="heartbeat_interval_ms"):
        load_settings()


def test_event_rejects_non_finite_value():
    with pytest.raises(ValidationError, match="finite"):
        InteractionEvent.model_validate_json(
            b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"rating","value":NaN,"ts":1}'
        )


def test_pool_query_weights_recent_items_more():
    history = np.zeros((2, 1, 2), dtype=np.float32)
    history[0, 0] = [1, 0]  # older
    history[1, 0] = [0, 1]  # newest
    q = pool_query(history, decay=0.5)
    assert q[0, 1] > q[0, 0] > 0
    assert np.isclose(np.linalg.norm(q[0]), 1.0)


def test_score_and_top_k_order():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    items = np.array([[[0.2, 0.0]], [[0.9, 0.0]], [[0.5, 0.0]]], dtype=np.float32)
    prior = np.array([0.0, 0.0, 0.5], dtype=np.float32)
    s = score(q, items, prior)
    assert list(top_k(s, 2)) == [2, 1]
