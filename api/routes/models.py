"""The model store: list, read, delete (refused while a job uses the model)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import func, select

from api.deps import DbSession, Owner
from api.params import Limit
from api.schemas.models import ModelPublic, ModelsPublic
from api.services.models import delete_model, get_model_or_404
from db.models import Model

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelsPublic)
def list_models(db: DbSession, owner: Owner, kind: str | None = None,
                limit: Limit = 200) -> ModelsPublic:
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
def remove_model(ref: str, db: DbSession, owner: Owner) -> Response:
    delete_model(db, ref)
    return Response(status_code=204)
