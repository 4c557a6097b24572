"""Wire schemas shared by every process (docs/design.md §Wire formats).

JSON on the wire. External ids are strings; the learner maps them to dense rows. These models are the
contract between producers, the consumers' validation step and the learner: change them here only.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_ID = Field(min_length=1, max_length=256)
_FLOAT32_MAX = 3.4028234663852886e38


class InteractionEvent(BaseModel):
    """A user engaged with an item. ``event_id`` is unique; duplicates are dropped within a window."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)

    event_id: str = _ID
    user_id: str = _ID
    item_id: str = _ID
    event_type: str = Field(min_length=1, max_length=32)
    value: float | None = None
    ts: int = Field(ge=0, lt=10**14, description="event time, epoch milliseconds")

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        # The learner keeps values as float32: anything beyond its range would turn into infinity there.
        if value is not None and not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
            raise ValueError("value must be finite and within float32 range (NaN, infinity and |value| > 3.4e38 "
                             "are rejected)")
        return value


class ItemEvent(BaseModel):
    """Catalogue change: an item appears/changes (``upsert``) or leaves the index at once (``delete``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    item_id: str = _ID
    op: Literal["upsert", "delete"] = "upsert"
    created_ts: int = Field(0, ge=0, lt=10**14, description="epoch milliseconds")
    tags: list[str] = Field(default_factory=list, max_length=64)
    text: str | None = Field(None, max_length=4096)
