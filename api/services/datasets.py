"""Datasets: where an import may read from, and creating the dataset row with its import job."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from api.errors import unprocessable
from api.schemas.datasets import DatasetCreated, DatasetPublic
from api.schemas.jobs import JobPublic
from api.services import jobs
from csra.settings import get_settings
from csra.specs import ImportSpec
from db.jobs import JobKind
from db.models import Dataset
from db.session import get_sessionmaker

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOWED_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def resolve_source(source: str) -> str:
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


def create(name: str, source: str, spec: ImportSpec, owner: str | None) -> DatasetCreated:
    """Runs in the thread pool with its own session (never on the event loop)."""
    with get_sessionmaker()() as db:
        return _create_in(db, name, source, spec, owner)


def _create_in(db: Session, name: str, source: str, spec: ImportSpec, owner: str | None) -> DatasetCreated:
    ds = Dataset(name=name, source=source, options=spec.model_dump(), owner=owner)
    db.add(ds)
    db.flush()
    job = jobs.submit(db, JobKind.IMPORT, {"dataset_id": ds.id}, owner=owner, dataset_id=ds.id, undo=[ds])
    db.refresh(ds)
    return DatasetCreated(dataset=DatasetPublic.model_validate(ds), job=JobPublic.model_validate(job))


async def save_upload(upload: UploadFile, max_bytes: int) -> Path:
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


def parse_options(raw: Any) -> ImportSpec:
    try:
        data = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
        return ImportSpec.model_validate(data)
    except json.JSONDecodeError as e:
        raise HTTPException(status_code=422, detail=f"'options' is not valid JSON: {e}") from None
    except ValidationError as e:
        raise unprocessable(e, "invalid import options") from None


