"""``GET /v1/items/{item_id}/similar``: an item's nearest items."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from pipeline.service import UnknownItemError
from serving.deps import ServiceDep
from serving.errors import error_response
from serving.schemas import MAX_K, ErrorOut, Id, ItemOut, SimilarOut

router = APIRouter(tags=["items"])


@router.get(
    "/v1/items/{item_id}/similar",
    response_model=SimilarOut,
    responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
def similar(
    item_id: Annotated[Id, PathParam()],
    service: ServiceDep,
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
) -> Any:
    try:
        found = service.similar_items(item_id, k)
    except UnknownItemError as exc:
        return error_response(404, str(exc))
    return SimilarOut(
        item_id=item_id,
        items=[
            ItemOut(item_id=s.item_id, score=s.score, rank=r + 1, sources=[s.source])
            for r, s in enumerate(found)
        ],
    )
