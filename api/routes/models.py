"""The model store: list, read, delete (refused while a job uses the model)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy import func, select

from api.deps import DbSession, Owner
from api.schemas import ModelPublic, ModelsPublic
from csra.settings import get_settings
from db.models import TERMINAL, Job, Model

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/models", tags=["models"])


def find_model(db: DbSession, ref: str) -> Model | None:
    """A model by numeric id or by name."""
    if ref.isdigit():
        return db.get(Model, int(ref))
    return db.scalar(select(Model).where(Model.name == ref))


def get_model_or_404(db: DbSession, ref: str) -> Model:
    model = find_model(db, ref)
    if model is None:
        raise HTTPException(status_code=404, detail=f"model {ref!r} not found (GET /models lists them)")
    return model


def jobs_using(db: DbSession, model: Model) -> list[int]:
    """Unfinished jobs whose parameters name this model (by id or name)."""
    refs = {str(model.id), model.name}
    active = db.scalars(select(Job).where(Job.status.not_in(TERMINAL))).all()
    using = []
    for job in active:
        p = job.params or {}
        named = {str(p.get("base_model", "")), str(p.get("model_id", ""))}
        named |= {str(m) for m in p.get("model_ids", []) or []}
        if refs & named:
            using.append(job.id)
    return using


@router.get("", response_model=ModelsPublic)
def list_models(
    db: DbSession, owner: Owner, kind: str | None = None, limit: int = Query(200, ge=1, le=1000)
) -> ModelsPublic:
    q = select(Model)
    if kind:
        q = q.where(Model.kind == kind)
    count = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = db.scalars(q.order_by(Model.id).limit(limit)).all()
    return ModelsPublic(data=[ModelPublic.model_validate(m) for m in rows], count=count)


@router.get("/{ref}", response_model=ModelPublic)
def read_model(ref: str, db: DbSession, owner: Owner) -> Model:
    return get_model_or_404(db, ref)


@router.delete("/{ref}", status_code=204)
def delete_model(ref: str, db: DbSession, owner: Owner) -> Response:
    model = get_model_or_404(db, ref)
    busy = jobs_using(db, model)
    if busy:
        raise HTTPException(
            status_code=409,
            detail=f"model {model.name!r} is in use by unfinished job(s) {busy}; cancel them or wait",
        )
    path = Path(model.path)
    store = get_settings().store_dir.resolve()
    db.delete(model)
    db.commit()
    if path.resolve().is_relative_to(store) and path.exists():
        shutil.rmtree(path, ignore_errors=True)
    return Response(status_code=204)
