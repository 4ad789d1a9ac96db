"""The model store: list, read, delete (refused while a job uses the model)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import func, select

from api.deps import Admin, Agent, DbSession
from api.params import Limit
from api.roles import RoleRoute
from api.schemas.models import ModelPublic, ModelsPublic
from api.services.models import delete_model, get_model_or_404
from db.models import Model

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
