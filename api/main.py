"""The FastAPI gateway. ``app`` is built at import without touching the database or Redis."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import csra
from api.errors import errors_detail
from api.guards import RequestGuard
from api.routes import (
    chats,
    datasets,
    evaluations,
    generation,
    health,
    jobs,
    me,
    memory,
    models,
    openai_compat,
    profile,
    training,
)
from api.schemas.common import errors
from csra.enqueue import QueueUnavailable
from csra.memory import MemoryNotBuilt
from csra.settings import get_settings

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


async def _too_large_number(request: Request, exc: OverflowError) -> JSONResponse:
    """A number past what the database stores (an id or offset over 2**63-1) that no schema bound caught."""
    return JSONResponse(status_code=422, content={"detail": f"a number in the request is too large ({exc})"})


async def _memory_not_built(request: Request, exc: MemoryNotBuilt) -> JSONResponse:
    return JSONResponse(status_code=409, content={"detail": str(exc)})


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Refuse to start on a non-loopback address with no API key (uvicorn exits with this message)."""
    problem = get_settings().open_bind_problem()
    if problem:
        logger.error(problem)
        raise RuntimeError(problem)
    yield


# what any protected route may answer besides its own success (the guards, auth, validation, queue)
COMMON_ERRORS = errors(400, 401, 403, 404, 409, 413, 415, 422, 503)


def create_app() -> FastAPI:
    app = FastAPI(
        title="csra",
        version=csra.__version__,
        description="Customer Support Response Assistant: datasets, fine-tuning, evaluation and chat jobs.",
        lifespan=_lifespan,
    )
    app.include_router(health.router)
    for module in (me, datasets, generation, jobs, training, evaluations, models, chats, memory, profile,
                   openai_compat):  # each route states its role (api.roles)
        app.include_router(module.router, responses=COMMON_ERRORS)
    app.add_middleware(RequestGuard)
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(QueueUnavailable, _queue_down)  # type: ignore[arg-type]
    app.add_exception_handler(MemoryNotBuilt, _memory_not_built)  # type: ignore[arg-type]
    app.add_exception_handler(OverflowError, _too_large_number)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)
    _ = HTTPException  # HTTPException bodies are FastAPI's default {"detail": ...}
    return app


app = create_app()
