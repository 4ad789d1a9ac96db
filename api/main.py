"""The FastAPI gateway. ``app`` is built at import without touching the database or Redis."""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import csra
from api.deps import require_key
from api.errors import errors_detail
from api.routes import (
    chats,
    datasets,
    evaluations,
    generation,
    health,
    jobs,
    memory,
    models,
    openai_compat,
    profile,
    training,
)
from csra.enqueue import QueueUnavailable
from csra.memory import MemoryNotBuilt

logger = logging.getLogger(__name__)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        status_code=500,
        content={"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
    )


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": errors_detail(list(exc.errors()))})


async def _queue_down(request: Request, exc: QueueUnavailable) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": str(exc)})


async def _memory_not_built(request: Request, exc: MemoryNotBuilt) -> JSONResponse:
    return JSONResponse(status_code=409, content={"detail": str(exc)})


def create_app() -> FastAPI:
    app = FastAPI(
        title="csra",
        version=csra.__version__,
        description="Customer Support Response Assistant: datasets, fine-tuning, evaluation and chat jobs.",
    )
    app.include_router(health.router)
    protected = [Depends(require_key)]
    for module in (datasets, generation, jobs, training, evaluations, models, chats, memory, profile,
                   openai_compat):
        app.include_router(module.router, dependencies=protected)
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(QueueUnavailable, _queue_down)  # type: ignore[arg-type]
    app.add_exception_handler(MemoryNotBuilt, _memory_not_built)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)
    _ = HTTPException  # HTTPException bodies are FastAPI's default {"detail": ...}
    return app


app = create_app()
