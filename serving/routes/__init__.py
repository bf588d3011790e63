"""The HTTP routes, one router per resource; ``serving.app.create_app`` includes them all."""

from __future__ import annotations

from serving.routes.admin import router as admin_router
from serving.routes.feedback import router as feedback_router
from serving.routes.health import router as health_router
from serving.routes.items import router as items_router
from serving.routes.recommend import router as recommend_router

ROUTERS = (recommend_router, feedback_router, items_router, health_router, admin_router)
