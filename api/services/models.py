"""Models as the API sees them: resolve a reference (422), find one (404), delete one (409 while used),
set a grounded one's reply settings, export one (a job) and find its exported files."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from api.schemas.models import ExportRequest, ModelFile
from api.services import jobs
from api.services.access import Caller
from csra.settings import get_settings
from csra.specs import EXPORTS_DIR, GGUF_ARCHITECTURES, RETRIEVAL, ExportSpec, ReplySettings
from db.jobs import JobKind
from db.models import Job, Model
from models_store.naming import gguf_exports
from models_store.registry import delete_published, find_model, jobs_using
from models_store.remote import CHUNK, ModelStoreError, store_from_settings


def resolve_model_name(db: Session, ref: str) -> str:
    """The stored name of the model ``ref`` names (id or name); 422 for one not in the store."""
    model = find_model(db, ref)
    if model is None:
        raise HTTPException(status_code=422, detail=f"unknown model {ref!r}: GET /models lists the models")
    return model.name


def get_model_or_404(db: Session, ref: str) -> Model:
    model = find_model(db, ref)
    if model is None:
        raise HTTPException(status_code=404, detail=f"model {ref!r} not found (GET /models lists them)")
    return model


def delete_model(db: Session, ref: str) -> None:
    """Remove the row and its store folder (and its copy in the shared store, ``CSRA_MODEL_STORE_URL``);
    refused (409) while an unfinished job uses the model, 503 while the shared store is unreachable."""
    model = get_model_or_404(db, ref)
    if model.kind == RETRIEVAL:
        raise HTTPException(status_code=409, detail=f"{model.name!r} is built in (an approved answer of the "
                                                    "answer memory); it cannot be deleted")
    busy = jobs_using(db, model)
    if busy:
        raise HTTPException(status_code=409,
                            detail=f"model {model.name!r} is in use by unfinished job(s) {busy}; cancel them or wait")
    path = Path(model.path)
    store = get_settings().store_dir.resolve()
    try:  # the shared store first: a model that stays registered stays fetchable
        delete_published(model.name)
    except ModelStoreError as e:
        raise HTTPException(status_code=503, detail=f"{e}; the model was not deleted") from None
    db.delete(model)
    db.commit()
    if path.resolve().is_relative_to(store) and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def set_reply_settings(db: Session, ref: str, settings: ReplySettings) -> Model:
    """Replace a grounded model's reply settings (each one left out goes back to its trained value); 422 for
    a model that was not trained grounded. The next reply, chat turn and evaluation use them: workers read
    a model's grounding from its row for every job, so no cached copy holds the old ones."""
    model = get_model_or_404(db, ref)
    if model.kind == RETRIEVAL or not (model.training_config or {}).get("grounding"):
        raise HTTPException(status_code=422, detail=f"model {model.name!r} was not trained grounded: reply "
                                                    "settings are for grounded models (a reply can still set "
                                                    "its own loop guard)")
    model.reply_settings = settings.model_dump(exclude_none=True) or None
    db.commit()
    db.refresh(model)
    return model


def submit_export(db: Session, ref: str, body: ExportRequest, caller: Caller) -> Job:
    """Queue the export of a model as GGUF: 404 for an unknown model, 422 for one the converter cannot take."""
    model = get_model_or_404(db, ref)
    if model.kind == RETRIEVAL:
        raise HTTPException(status_code=422, detail=f"{model.name!r} is not a model (it answers with an "
                                                    "approved answer); there are no weights to export")
    if model.architecture not in GGUF_ARCHITECTURES:
        raise HTTPException(status_code=422, detail=(
            f"model {model.name!r} is a {model.architecture or 'model of unknown architecture'}; GGUF export "
            f"supports {', '.join(GGUF_ARCHITECTURES)} (SmolLM2 and other Llama models)"))
    spec = ExportSpec(model_id=model.name, format=body.format, quantization=body.quantization)
    return jobs.submit(db, JobKind.EXPORT, spec.model_dump(mode="json"), caller=caller)


def _exports_dir(model: Model) -> Path:
    return Path(model.path) / EXPORTS_DIR


def _published_exports(model: Model) -> dict[str, dict[str, Any]]:
    """The model's exports in the shared store (``CSRA_MODEL_STORE_URL``; none without one): 503 while
    the store is unreachable."""
    remote = store_from_settings()
    if remote is None:
        return {}
    try:
        return remote.exports(model.name, model.content_hash)
    except ModelStoreError as e:
        raise HTTPException(status_code=503, detail=str(e)) from None


def model_files(model: Model) -> list[ModelFile]:
    """The files exported from a model (``POST /models/{ref}/export``), newest first: those of this host's
    folder and, with a shared store, those published from any host."""
    found: dict[str, tuple[float, int]] = {p.name: (p.stat().st_mtime, p.stat().st_size)
                                           for p in gguf_exports(Path(model.path))}
    for name, record in _published_exports(model).items():
        found.setdefault(name, (float(record.get("published_at") or 0), int(record["size"])))
    newest = sorted(found.items(), key=lambda kv: kv[1][0], reverse=True)
    return [ModelFile(name=name, size_bytes=size, url=f"/models/{model.name}/files/{name}")
            for name, (_, size) in newest]


def model_file(model: Model, name: str) -> Response:
    """One exported file by name (only names ``model_files`` lists: never a path), from this host's folder
    or streamed from the shared store."""
    if name not in {f.name for f in model_files(model)}:
        raise HTTPException(status_code=404, detail=f"model {model.name!r} has no exported file {name[:100]!r} "
                                                    f"(GET /models/{model.name}/files lists them)")
    path = _exports_dir(model) / name
    if path.is_file():
        return FileResponse(path, media_type="application/octet-stream", filename=name)
    remote = store_from_settings()
    assert remote is not None  # listed, not here: published
    try:
        source = remote.open_export(model.name, name)
    except ModelStoreError as e:
        raise HTTPException(status_code=503, detail=str(e)) from None

    def chunks() -> Iterator[bytes]:
        with source:
            while block := source.read(CHUNK):
                yield block

    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})
