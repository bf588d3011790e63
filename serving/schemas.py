"""HTTP request and response models (separate, as the contract in INTERFACE.md lays them out).

Limits live here so bad input is refused at the edge with a 422 that names the field, before it
reaches the pipeline: the service must never answer 5xx for anything a client can send.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.feedback_log import DEFAULT_TYPE_WEIGHTS

# Ids are opaque strings; 256 characters is far beyond any real id and keeps memory bounded.
MAX_ID_LENGTH = 256
MAX_K = 200
MAX_EXCLUDE = 1_000
MAX_EVENTS = 1_000

# The event types the service accepts: those of the feedback log it opens, which has the default
# weights (the service has no setting for others). Listed as an enum in the OpenAPI schema; the
# value is checked by FeedbackLog.make_event, whose 422 names the bad type and the allowed ones,
# so the list lives in one place and cannot drift from what the log accepts.
EVENT_TYPES = tuple(DEFAULT_TYPE_WEIGHTS)


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    k: int = Field(default=10, ge=1, le=MAX_K)
    context: dict[str, Any] | None = None
    exclude_item_ids: list[str] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    explain: bool = False


class ItemOut(BaseModel):
    item_id: str
    score: float
    rank: int
    sources: list[str]


class TimingsOut(BaseModel):
    retrieval: float
    ranking: float
    reranking: float
    total: float


class RecommendOut(BaseModel):
    user_id: str
    items: list[ItemOut]
    model_version: str
    degraded: list[str]
    timings_ms: TimingsOut
    explanation: dict[str, Any] | None = None


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    type: str = Field(
        min_length=1,
        max_length=32,
        description=(
            f"What the user did, one of {', '.join(EVENT_TYPES)} (any other is a 422). "
            "impression: shown without engagement (logged for training and monitoring, adds "
            "nothing to the user's history); the others are positives of increasing strength."
        ),
        examples=["click"],
        json_schema_extra={"enum": list(EVENT_TYPES)},
    )
    timestamp: int | None = Field(default=None, ge=0, le=2**62)


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class FeedbackOut(BaseModel):
    accepted: int
    duplicates: int


class SimilarOut(BaseModel):
    item_id: str
    items: list[ItemOut]


class ReloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(min_length=1, max_length=4096)


class ReloadOut(BaseModel):
    model_version: str
    previous_model_version: str


MAX_ITEMS = 10_000
MAX_CATEGORIES = 32


class CatalogItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    categories: list[str] | None = Field(
        default=None,
        max_length=MAX_CATEGORIES,
        description="Category names; those the bundle was not trained with are dropped.",
    )
    created_at: int | None = Field(
        default=None, ge=0, le=2**62, description="Release time, seconds UTC."
    )


class CatalogItemsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[CatalogItemIn] = Field(min_length=1, max_length=MAX_ITEMS)


class CatalogItemsOut(BaseModel):
    added: int = Field(description="Ids new to the served catalogue.")
    updated: int = Field(description="Known ids whose features were read again.")
    sources: list[str] = Field(description="Retrieval sources that embedded the items.")


class ErrorOut(BaseModel):
    error: str
    detail: Any = None


class HealthOut(BaseModel):
    status: Literal["ok", "loading"]
    model_version: str | None = None
