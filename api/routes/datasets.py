"""Datasets: import (upload or server-side source), list, read, examples."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import Admin, DbSession
from api.errors import unprocessable
from api.guards import upload_limit_bytes
from api.params import IdPath, Limit, Offset
from api.roles import RoleRoute
from api.schemas.datasets import (
    NAME_MAX,
    DatasetCreate,
    DatasetCreated,
    DatasetPublic,
    DatasetsPublic,
    ExamplePublic,
    ExamplesPublic,
)
from api.services import datasets
from csra.settings import get_settings
from db.models import Dataset, DatasetExample, DatasetStatus

router = APIRouter(route_class=RoleRoute, prefix="/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=202,
    response_model=DatasetCreated,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": DatasetCreate.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string"},
                            "options": {"type": "string", "description": "ImportSpec as JSON"},
                        },
                        "required": ["file"],
                    }
                },
            }
        }
    },
)
async def create_dataset(request: Request, caller: Admin) -> DatasetCreated:
    """Import a dataset: JSON ``{name, source, options}`` or a multipart upload (``file``).

    The body size is capped as it arrives by ``api.guards`` (CSRA_MAX_UPLOAD_MB, chunked uploads
    included), which also answered other content types 415."""
    settings = get_settings()
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(status_code=422, detail="multipart upload needs a 'file' field")
        spec = datasets.parse_options(form.get("options"))
        name = str(form.get("name") or "")
        if len(name) > NAME_MAX:
            raise HTTPException(status_code=422, detail=f"'name' is longer than {NAME_MAX} characters")
        path = await datasets.save_upload(upload, upload_limit_bytes(settings.max_upload_mb))
        return await run_in_threadpool(datasets.create, name or path.stem, f"upload:{path}", spec, caller)
    try:
        body = DatasetCreate.model_validate(await request.json())
    except ValidationError as e:
        raise unprocessable(e) from None
    except (ValueError, RecursionError):  # not JSON, or nested too deep for the parser
        raise HTTPException(
            status_code=422, detail="send JSON {name, source, options} or a multipart upload with a 'file' field"
        ) from None
    source = await run_in_threadpool(datasets.resolve_source, body.source)  # blocking DB/Redis work off the event loop
    return await run_in_threadpool(datasets.create, body.name, source, body.options, caller)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    db: DbSession, caller: Admin, limit: Limit = 100, offset: Offset = 0
) -> DatasetsPublic:
    count = db.scalar(select(func.count(Dataset.id))) or 0
    rows = db.scalars(select(Dataset).order_by(Dataset.id.desc()).limit(limit).offset(offset)).all()
    return DatasetsPublic(data=[DatasetPublic.model_validate(d) for d in rows], count=count)


def get_dataset_or_404(db: Session, dataset_id: int) -> Dataset:
    ds = db.get(Dataset, dataset_id)
    if ds is None:
        raise HTTPException(status_code=404, detail=f"dataset {dataset_id} not found")
    return ds


@router.get("/{dataset_id}", response_model=DatasetPublic)
def read_dataset(dataset_id: IdPath, db: DbSession, caller: Admin) -> Dataset:
    return get_dataset_or_404(db, dataset_id)


@router.get("/{dataset_id}/examples", response_model=ExamplesPublic)
def dataset_examples(
    dataset_id: IdPath,
    db: DbSession,
    caller: Admin,
    split: Literal["train", "validation", "test"] | None = None,
    intent: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> ExamplesPublic:
    ds = get_dataset_or_404(db, dataset_id)
    if ds.status != DatasetStatus.READY:
        raise HTTPException(status_code=409, detail=f"dataset {dataset_id} is {ds.status}, not ready")
    q = select(DatasetExample).where(DatasetExample.dataset_id == dataset_id)
    if split:
        q = q.where(DatasetExample.split == split)
    if intent:
        q = q.where(DatasetExample.intent == intent)
    count = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = db.scalars(q.order_by(DatasetExample.id).limit(limit).offset(offset)).all()
    return ExamplesPublic(data=[ExamplePublic.model_validate(r) for r in rows], count=count)
