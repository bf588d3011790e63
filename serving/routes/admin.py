"""``/admin/*``: hot reload and live catalogue updates, behind a bearer token.

The token is checked before anything else of the request is read (:class:`AdminRoute`): an
anonymous caller gets 401 whatever its body, never a 422 that describes the schema, and its body
is not even parsed. No token configured: every admin route answers 403.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import polars as pl
from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from data.errors import BundleError, DataError
from serving.deps import ServiceDep
from serving.errors import error_response, escape_unprintable
from serving.memory import freeze_long_lived_objects
from serving.schemas import CatalogItemsIn, CatalogItemsOut, ErrorOut, ReloadIn, ReloadOut
from serving.settings import ServiceSettings

logger = logging.getLogger(__name__)


def admin_refusal(expected: bytes | None, authorization: str | None) -> Response | None:
    """The answer to an admin request without a valid bearer token (None: it may proceed).

    ``Authorization: Bearer <token>``: the scheme case-insensitively (RFC 9110 11.1), one space,
    then the credentials exactly as sent (nothing stripped: a stripped ``Bearer <nbsp>`` was once
    an empty token), compared as UTF-8 bytes in constant time (a non-ASCII str would make
    ``hmac.compare_digest`` raise).
    """
    if expected is None:
        return error_response(403, "admin endpoints are disabled")
    scheme, space, credentials = (authorization or "").partition(" ")
    valid = (
        space == " "
        and scheme.isascii()
        and scheme.lower() == "bearer"
        and hmac.compare_digest(credentials.encode("utf-8"), expected)
    )
    if not valid:
        return error_response(
            401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return None


class AdminRoute(APIRoute):
    """A route that answers 401/403 before its body is read, parsed or validated."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            settings: ServiceSettings = request.app.state.settings
            refused = admin_refusal(
                settings.admin_token_bytes(), request.headers.get("authorization")
            )
            if refused is not None:
                return refused
            return await handler(request)

        return guarded


# HTTPBearer only documents the scheme in the OpenAPI schema (the docs page's "Authorize");
# AdminRoute has already checked the header when it runs.
router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(HTTPBearer(auto_error=False))],
    responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}},
)


@router.post("/reload", response_model=ReloadOut, responses={409: {"model": ErrorOut}})
def reload(body: ReloadIn, service: ServiceDep) -> Any:
    started = time.perf_counter()
    try:
        new, old = service.reload(body.bundle)
    except (BundleError, DataError) as exc:
        message = escape_unprintable(str(exc))
        logger.error(
            "refused bundle %r: %s (still serving %s)",  # %r: a path may hold NUL, CR, LF
            body.bundle,
            message,
            service.pipeline.model_version,
        )
        return error_response(409, f"bundle refused: {message}")
    freeze_long_lived_objects(collect=False)  # no 100 ms collection while serving
    logger.info("reload took %.1f s", time.perf_counter() - started)
    return ReloadOut(model_version=new, previous_model_version=old)


@router.post("/items", response_model=CatalogItemsOut, responses={422: {"model": ErrorOut}})
def add_items(body: CatalogItemsIn, service: ServiceDep) -> Any:
    """Serve new (or changed) items from the next request on, without a retrain: embedded by the
    item tower into the live index. Not kept across a reload or restart."""
    frame = pl.DataFrame(
        [item.model_dump() for item in body.items],
        schema={"item_id": pl.String, "categories": pl.List(pl.String), "created_at": pl.Int64},
    )
    try:
        change = service.add_items(frame)
    except DataError as exc:
        return error_response(422, str(exc))
    return CatalogItemsOut(added=change.added, updated=change.updated, sources=list(change.sources))
