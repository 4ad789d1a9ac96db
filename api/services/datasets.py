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
from api.services.access import Caller
from csra.settings import get_settings
from csra.specs import ImportSpec
from db.jobs import JobKind
from db.models import Dataset
from db.session import get_sessionmaker

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOWED_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


IMPORT_FOLDERS = ("the allowed import folders (the data dir's 'imports' folder, the Bitext copy's folder "
                  "and CSRA_IMPORT_ROOTS)")
MAX_NAME_CHARS = 120  # of an uploaded file's name as stored (file systems refuse names over 255 bytes)


def resolve_source(source: str) -> str:
    """A stored source string: ``file:<abs path>`` or ``hf:<id>``; 422/403 with a reason otherwise.

    Errors quote the source as typed, never the resolved absolute path (it would show the server's
    working dir, home and data dir to the caller)."""
    if source.startswith("hf:"):
        return source
    shown = source if len(source) <= 200 else source[:200] + "..."
    try:
        candidate = Path(source).expanduser()
        looks_like_path = (candidate.is_absolute() or source.startswith((".", "~"))
                           or candidate.suffix in ALLOWED_SUFFIXES)
        if not looks_like_path and HF_ID.match(source):
            return f"hf:{source}"
        path = candidate.resolve()
        if not get_settings().importable(path):
            raise HTTPException(
                status_code=403,
                detail=f"source {shown!r} is outside {IMPORT_FOLDERS}; "
                "upload the file instead, or add its folder to CSRA_IMPORT_ROOTS",
            )
        is_file = path.is_file()
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, over-long names, symlink loops, no home
        raise HTTPException(status_code=422, detail=f"source {shown!r} is not a usable path: "
                                                    f"{getattr(e, 'strerror', None) or e}") from None
    if not is_file:
        raise HTTPException(status_code=422, detail=f"no file at {shown!r} (in {IMPORT_FOLDERS})")
    return f"file:{path}"


def upload_name(raw: str | None) -> str:
    """The uploaded file's own name, made safe to store: no folders, no NUL/control characters, and
    at most MAX_NAME_CHARS characters (the suffix kept); 415 unless it is a .csv, .jsonl or .parquet."""
    name = Path((raw or "upload").replace("\\", "/")).name
    name = "".join(c for c in name if c.isprintable()).strip() or "upload"
    stem, suffix = Path(name).stem, Path(name).suffix
    if suffix.lower() not in ALLOWED_SUFFIXES:
        raise HTTPException(
            status_code=415,
            detail=f"unsupported file type {name[:MAX_NAME_CHARS]!r}: upload a .csv, .jsonl or .parquet file",
        )
    return stem[: MAX_NAME_CHARS - len(suffix)] + suffix


def create(name: str, source: str, spec: ImportSpec, caller: Caller) -> DatasetCreated:
    """Runs in the thread pool with its own session (never on the event loop)."""
    with get_sessionmaker()() as db:
        return _create_in(db, name, source, spec, caller)


def _create_in(db: Session, name: str, source: str, spec: ImportSpec, caller: Caller) -> DatasetCreated:
    ds = Dataset(name=name, source=source, options=spec.model_dump(), owner=caller.name)
    db.add(ds)
    db.flush()
    job = jobs.submit(db, JobKind.IMPORT, {"dataset_id": ds.id}, caller=caller, dataset_id=ds.id, undo=[ds])
    db.refresh(ds)
    return DatasetCreated(dataset=DatasetPublic.model_validate(ds), job=JobPublic.model_validate(job))


async def save_upload(upload: UploadFile, max_bytes: int) -> Path:
    """Stream the upload into the data dir, refusing empty files and files over the limit."""
    filename = upload_name(upload.filename)
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


