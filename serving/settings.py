"""Settings of the HTTP service: ``RECSYS_<FIELD>`` in the environment, or arguments.

Read once, when the app is built (``serving.app.create_app`` / ``app_from_env``), never at import
time. The admin token is read here too: from ``RECSYS_ADMIN_TOKEN`` or from the file named by
``RECSYS_ADMIN_TOKEN_FILE`` (``recsys serve --admin-token-file``), so it never has to appear on a
command line, where ``ps`` shows it to every user of the machine.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.funnel import BudgetConfig
from pipeline.service import DEFAULT_MAX_ONLINE_USERS
from serving.schemas import MAX_EVENTS

# A token an attacker cannot guess in a reasonable number of tries: 16 characters of visible
# ASCII are ~100 bits even if only letters and digits are used.
MIN_ADMIN_TOKEN_LENGTH = 16


class ServiceSettings(BaseSettings):
    """Service configuration; every field can be set as ``RECSYS_<FIELD>`` in the environment."""

    # hide_input_in_errors: a refused admin token must not be printed in the start-up error.
    model_config = SettingsConfigDict(env_prefix="RECSYS_", hide_input_in_errors=True)

    bundle: Path
    data: Path | None = None  # dataset directory whose train+valid splits seed user histories
    # A SQLite file (one machine; the embedded default) or a postgresql:// URL (replicas on
    # several machines). The URL may carry a password: set it in the environment
    # (RECSYS_FEEDBACK_DB), not on a command line.
    feedback_db: str = "feedback.sqlite3"
    # How often each worker applies what other workers logged (pipeline/log_follower.py): the
    # feedback visibility lag between workers is about this plus one read.
    follow_interval_ms: float = Field(default=20.0, gt=0)
    # Bearer token for /admin/*: at least MIN_ADMIN_TOKEN_LENGTH characters of visible ASCII (what
    # an Authorization header carries). Neither this nor admin_token_file set: /admin/* answer 403.
    admin_token: SecretStr | None = None
    # A file whose content (minus one trailing line break) is the token; read once at start-up.
    admin_token_file: Path | None = None
    # 1 MB holds 1000 feedback events with room to spare; anything larger is refused with 413.
    max_body_bytes: int = 1_000_000
    retrieval_budget_ms: float = 10.0
    ranking_budget_ms: float = 20.0
    reranking_budget_ms: float = 5.0
    # Stages on worker threads: the answer never waits past a budget, for 0.3-3.8 ms more a
    # request (pipeline/funnel.py); the default checks the deadlines on the batch's own thread.
    preemptive_budgets: bool = False
    # Concurrent recommend requests answered by one pipeline call at most (dynamic batching,
    # serving/batcher.py); 1 answers every request alone.
    max_batch: int = Field(default=8, ge=1, le=256)
    # A recommend request the pipeline has not answered within this time (queued behind an
    # overloaded or stuck batch) is answered with the popular fallback, "pipeline:timeout" in
    # `degraded`, and withdrawn from the queue. Default: two full batches at their budgets (the
    # one running, then the request's own): 315 ms with the default budgets and max_batch, far
    # above a loaded request's p99 (~25 ms on the 2-core reference machine).
    request_deadline_ms: float | None = Field(default=None, gt=0)
    # Feedback events one client (IP address) may post per second, sustained, per worker; 0 turns
    # the limit off. Past it: 429 with Retry-After. Generous on purpose: one application server
    # often posts the feedback of all its users, and a burst of this many events passes at once.
    # Behind a reverse proxy, the client is the proxy unless uvicorn trusts its X-Forwarded-For
    # (--forwarded-allow-ips).
    feedback_events_per_s: float = Field(default=1_000.0, ge=0)
    # Must hold the largest request (MAX_EVENTS events), or that request could never pass.
    feedback_burst_events: int = Field(default=5_000, ge=MAX_EVENTS)
    # Users held in this worker's online state beyond the bundle's own (least recently used
    # evicted first, read back from the feedback log when they return): bounds the memory that
    # unauthenticated feedback can claim (docs/benchmarks.md, "Online state memory").
    max_online_users: int = Field(default=DEFAULT_MAX_ONLINE_USERS, ge=1)
    # Seconds after which an idle held user is evicted too; None keeps them until the cap.
    online_user_ttl_s: float | None = Field(default=None, gt=0)
    # Train the two-tower online from the feedback this worker receives
    # (pipeline/online_learning), one update every online_interval_s; checkpointed to
    # online_checkpoint (a directory; None: a restart starts from the bundle's weights).
    online_learning: bool = False
    online_interval_s: float = Field(default=5.0, gt=0)
    online_checkpoint: Path | None = None

    @field_validator("feedback_db", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _read_admin_token(self) -> ServiceSettings:
        if self.admin_token_file is not None:
            if self.admin_token is not None:
                raise ValueError(
                    "both RECSYS_ADMIN_TOKEN and RECSYS_ADMIN_TOKEN_FILE are set; set one"
                )
            try:
                text = self.admin_token_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"admin token file {str(self.admin_token_file)!r} cannot be read: {exc}"
                ) from exc
            # One trailing line break is how editors and `echo` end a file, not part of a token.
            self.admin_token = SecretStr(text.removesuffix("\n").removesuffix("\r"))
        if self.admin_token is not None:
            check_admin_token(self.admin_token.get_secret_value())
        return self

    def admin_token_bytes(self) -> bytes | None:
        """The admin token as UTF-8 bytes (what a request's credentials are compared with), or
        None when the admin routes are off."""
        if self.admin_token is None:
            return None
        return self.admin_token.get_secret_value().encode("utf-8")

    def budgets(self) -> BudgetConfig:
        return BudgetConfig(
            retrieval_ms=self.retrieval_budget_ms,
            ranking_ms=self.ranking_budget_ms,
            reranking_ms=self.reranking_budget_ms,
            preemptive=self.preemptive_budgets,
        )

    def request_deadline_s(self) -> float:
        if self.request_deadline_ms is not None:
            return self.request_deadline_ms / 1000
        return 2 * self.budgets().for_call(self.max_batch) / 1000


def check_admin_token(token: str) -> None:
    """Raise ``ValueError`` unless ``token`` is usable as the admin bearer token.

    An empty token once let ``Authorization: Bearer <non-breaking space>`` in (stripped to "",
    equal to ""); a short one can be guessed. Visible ASCII only: that is what a header carries
    unchanged, and a token with a space could not be sent as ``Bearer <token>`` at all.
    """
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise ValueError(
            f"the admin token has {len(token)} characters; at least {MIN_ADMIN_TOKEN_LENGTH} "
            "are required (unset RECSYS_ADMIN_TOKEN and RECSYS_ADMIN_TOKEN_FILE to turn the "
            "admin endpoints off)"
        )
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(
            "the admin token must consist of visible ASCII characters (no spaces, control "
            "or non-ASCII characters)"
        )
