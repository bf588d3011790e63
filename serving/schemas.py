"""HTTP request and response models (separate request and response models; README "HTTP API").

Limits live here so bad input is refused at the edge with a 422 that names the field, before it
reaches the pipeline: the service must never answer 5xx for anything a client can send.

- Request models are strict: JSON types are not coerced (``"k": "10"``, ``"k": true`` and
  ``"explain": "yes"`` are 422), as the published schema promises.
- Every id and name is :data:`Id` / :data:`Name`: 1-256 characters, printable (see
  :func:`check_printable`). A lone surrogate (``"\\udfff"`` is valid JSON) cannot be encoded as
  UTF-8 and once failed a whole batch deep in the pipeline; control characters (NUL, CR, LF)
  corrupt logs and anything that stores the id as text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

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
# Plausible event times, seconds UTC: from 2000-01-01 (anything earlier, 0 above all, is a client
# bug, not an event) to 2100-01-01, the schema's static bound; the feedback log also refuses
# anything more than a day past the server's clock (milliseconds sent as seconds), a 422 too.
MIN_TIMESTAMP = 946_684_800
MAX_TIMESTAMP = 4_102_444_800
# Request models: unknown fields refused, JSON types taken as they are (no coercion).
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)


def check_printable(value: str) -> str:
    """``value`` unchanged if every character is printable (``str.isprintable``: no control,
    format, surrogate, private-use or unassigned code point, no separator but the ASCII space);
    else ``ValueError`` naming the first bad character by code point (never the raw character,
    which the error response could not encode)."""
    if value.isprintable():
        return value
    position, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
    raise ValueError(
        f"must be printable text: character {position} is U+{ord(char):04X}, a control, format, "
        "surrogate, separator or unassigned code point"
    )


Id = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(check_printable)
]
"""A user, item or event id: 1-256 printable characters."""
Name = Id
"""A category name: the same rules as an id."""


class RecommendIn(BaseModel):
    model_config = REQUEST_CONFIG

    user_id: Id
    k: int = Field(default=10, ge=1, le=MAX_K)
    context: dict[str, Any] | None = None
    exclude_item_ids: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE)
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
    model_config = REQUEST_CONFIG

    event_id: Id
    user_id: Id
    item_id: Id
    type: Annotated[str, AfterValidator(check_printable)] = Field(
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
    timestamp: int | None = Field(
        default=None,
        ge=MIN_TIMESTAMP,
        le=MAX_TIMESTAMP,
        description=(
            "When it happened, seconds UTC (default: when the server received it); from "
            "2000-01-01 to at most a day past the server's clock."
        ),
    )


class FeedbackIn(BaseModel):
    model_config = REQUEST_CONFIG

    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


# The feedback log position an answer reflects: on a recommendation, every logged event up to
# it had reached the answering worker's online state; on a feedback answer, the position of
# the append. A client that compares them measures how fast feedback becomes visible.
LOG_SEQ_HEADER = "X-Feedback-Log-Seq"
# Which worker process answered (its pid): with several workers behind one port, what tells a
# client (a test, an operator chasing one bad worker) whose state an answer came from.
WORKER_HEADER = "X-Served-By"


class FeedbackOut(BaseModel):
    accepted: int
    duplicates: int


class SimilarOut(BaseModel):
    item_id: str
    items: list[ItemOut]


class ReloadIn(BaseModel):
    model_config = REQUEST_CONFIG

    bundle: str = Field(min_length=1, max_length=4096)


class ReloadOut(BaseModel):
    model_version: str
    previous_model_version: str


MAX_ITEMS = 10_000
MAX_CATEGORIES = 32


class CatalogItemIn(BaseModel):
    model_config = REQUEST_CONFIG

    item_id: Id
    categories: list[Name] | None = Field(
        default=None,
        max_length=MAX_CATEGORIES,
        description="Category names; those the bundle was not trained with are dropped.",
    )
    created_at: int | None = Field(
        default=None, ge=0, le=2**62, description="Release time, seconds UTC."
    )


class CatalogItemsIn(BaseModel):
    model_config = REQUEST_CONFIG

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
