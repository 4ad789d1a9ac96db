"""The model store: list, read, delete (refused while a job uses the model), set a grounded model's reply
settings, export as GGUF and download."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse
from sqlalchemy import func, select

from api.deps import Admin, Agent, DbSession
from api.params import Limit
from api.roles import RoleRoute
from api.schemas.jobs import JobPublic
from api.schemas.models import ExportRequest, ModelFiles, ModelPublic, ModelsPublic
from api.services.models import (
    delete_model,
    get_model_or_404,
    model_file,
    model_files,
    set_reply_settings,
    submit_export,
)
from csra.specs import ReplySettings
from db.models import Job, Model

router = APIRouter(route_class=RoleRoute, prefix="/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(db: DbSession, caller: Agent, kind: str | None = None,
                limit: Limit = 200) -> ModelsPublic:
    q = select(Model)
    if kind:
        q = q.where(Model.kind == kind)
    count = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = db.scalars(q.order_by(Model.id).limit(limit)).all()
    return ModelsPublic(data=[ModelPublic.model_validate(m) for m in rows], count=count)


@router.get("/{ref}", response_model=ModelPublic)
def read_model(ref: str, db: DbSession, caller: Agent) -> Model:
    return get_model_or_404(db, ref)


@router.delete("/{ref}", status_code=204)
def remove_model(ref: str, db: DbSession, caller: Admin) -> Response:
    delete_model(db, ref)
    return Response(status_code=204)


@router.put("/{ref}/reply-settings", response_model=ModelPublic)
def put_reply_settings(ref: str, body: ReplySettings, db: DbSession, caller: Admin) -> Model:
    """Set how a grounded model's replies follow their approved answers, in place of what it was trained
    with (each setting left out: the trained value; ``{}``: all of them), e.g. to serve a setting an
    evaluation measured. Its ``grounding`` then shows what it replies with."""
    return set_reply_settings(db, ref, body)


@router.post("/{ref}/export", status_code=202, response_model=JobPublic)
def export_model(ref: str, body: ExportRequest, db: DbSession, caller: Admin) -> Job:
    """Write the model as one GGUF file (a job on ``default``), with its chat template, for llama.cpp,
    Ollama or LM Studio; the job's result names the file, its size and SHA-256."""
    return submit_export(db, ref, body, caller)


@router.get("/{ref}/files", response_model=ModelFiles)
def list_model_files(ref: str, db: DbSession, caller: Agent) -> ModelFiles:
    """The files exported from this model, newest first."""
    files = model_files(get_model_or_404(db, ref))
    return ModelFiles(data=files, count=len(files))


@router.get("/{ref}/files/{name}", response_class=FileResponse,
            responses={200: {"description": "the file", "content": {"application/octet-stream": {}}}})
def download_model_file(ref: str, name: str, db: DbSession, caller: Agent) -> Response:
    """Download an exported file."""
    return model_file(get_model_or_404(db, ref), name)
