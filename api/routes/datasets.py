"""Datasets: import (upload or server-side source), list, read, examples."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import DbSession, Owner
from api.enqueue import submit_job
from api.errors import unprocessable
from api.schemas import (
    DatasetCreate,
    DatasetCreated,
    DatasetPublic,
    DatasetsPublic,
    ExamplePublic,
    ExamplesPublic,
    JobPublic,
)
from csra.settings import get_settings
from csra.specs import ImportSpec
from db.models import Dataset, DatasetExample, DatasetStatus
from db.session import get_sessionmaker

router = APIRouter(prefix="/datasets", tags=["datasets"])

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOWED_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _resolve_source(source: str) -> str:
    """A stored source string: ``file:<abs path>`` or ``hf:<id>``; 422/403 with a reason otherwise."""
    settings = get_settings()
    if source.startswith("hf:"):
        return source
    candidate = Path(source).expanduser()
    looks_like_path = candidate.is_absolute() or source.startswith((".", "~")) or candidate.suffix in ALLOWED_SUFFIXES
    if not looks_like_path and HF_ID.match(source):
        return f"hf:{source}"
    path = candidate.resolve()
    roots = settings.allowed_import_roots
    if not any(path.is_relative_to(r) for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise HTTPException(
            status_code=403,
            detail=f"{path} is outside the allowed import folders ({allowed}); "
            "upload the file instead, or add its folder to CSRA_IMPORT_ROOTS",
        )
    if not path.is_file():
        raise HTTPException(status_code=422, detail=f"no file at {path}")
    return f"file:{path}"


def _create(name: str, source: str, spec: ImportSpec, owner: str | None) -> DatasetCreated:
    """Runs in the thread pool with its own session (never on the event loop)."""
    with get_sessionmaker()() as db:
        return _create_in(db, name, source, spec, owner)


def _create_in(db: Session, name: str, source: str, spec: ImportSpec, owner: str | None) -> DatasetCreated:
    ds = Dataset(name=name, source=source, options=spec.model_dump(), owner=owner)
    db.add(ds)
    db.flush()
    dataset_id = ds.id

    def rollback(s: Session) -> None:
        row = s.get(Dataset, dataset_id)
        if row is not None:
            s.delete(row)

    job = submit_job(db, "import", {"dataset_id": dataset_id}, owner=owner, dataset_id=dataset_id, on_rollback=rollback)
    db.refresh(ds)
    return DatasetCreated(dataset=DatasetPublic.model_validate(ds), job=JobPublic.model_validate(job))


async def _save_upload(upload: UploadFile, max_bytes: int) -> Path:
    """Stream the upload into the data dir, refusing empty files and files over the limit."""
    filename = Path(upload.filename or "upload").name
    if Path(filename).suffix.lower() not in ALLOWED_SUFFIXES:
        raise HTTPException(
            status_code=415,
            detail=f"unsupported file type {filename!r}: upload a .csv, .jsonl or .parquet file",
        )
    folder = get_settings().uploads_dir / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / filename
    size = 0
    try:
        with dest.open("wb") as out:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(
                        status_code=413,
                        detail=f"upload is over the limit of {max_bytes // (1 << 20)} MB (CSRA_MAX_UPLOAD_MB)",
                    )
                out.write(chunk)
        if size == 0:
            raise HTTPException(status_code=422, detail=f"the uploaded file {filename!r} is empty (0 bytes)")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return dest


def _parse_options(raw: Any) -> ImportSpec:
    try:
        data = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
        return ImportSpec.model_validate(data)
    except json.JSONDecodeError as e:
        raise HTTPException(status_code=422, detail=f"'options' is not valid JSON: {e}") from None
    except ValidationError as e:
        raise unprocessable(e, "invalid import options") from None


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
async def create_dataset(request: Request, owner: Owner) -> DatasetCreated:
    """Import a dataset: JSON ``{name, source, options}`` or a multipart upload (``file``)."""
    settings = get_settings()
    ctype = request.headers.get("content-type", "")
    max_bytes = int(settings.max_upload_mb * (1 << 20))
    if ctype.startswith("multipart/form-data"):
        declared = int(request.headers.get("content-length") or 0)
        if declared > max_bytes + (1 << 16):
            raise HTTPException(
                status_code=413,
                detail=f"upload is over the limit of {settings.max_upload_mb:g} MB (CSRA_MAX_UPLOAD_MB)"
            )
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(status_code=422, detail="multipart upload needs a 'file' field")
        spec = _parse_options(form.get("options"))
        path = await _save_upload(upload, max_bytes)
        name = str(form.get("name") or path.stem)
        return await run_in_threadpool(_create, name, f"upload:{path}", spec, owner)
    try:
        body = DatasetCreate.model_validate(await request.json())
    except ValidationError as e:
        raise unprocessable(e) from None
    except ValueError:
        raise HTTPException(
            status_code=422, detail="send JSON {name, source, options} or a multipart upload with a 'file' field"
        ) from None
    source = await run_in_threadpool(_resolve_source, body.source)  # blocking DB/Redis work off the event loop
    return await run_in_threadpool(_create, body.name, source, body.options, owner)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    db: DbSession, owner: Owner, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)
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
def read_dataset(dataset_id: int, db: DbSession, owner: Owner) -> Dataset:
    return get_dataset_or_404(db, dataset_id)


@router.get("/{dataset_id}/examples", response_model=ExamplesPublic)
def dataset_examples(
    dataset_id: int,
    db: DbSession,
    owner: Owner,
    split: Literal["train", "validation", "test"] | None = None,
    intent: str | None = None,
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0),
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
