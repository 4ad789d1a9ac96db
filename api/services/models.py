"""Models as the API sees them: resolve a reference (422), find one (404), delete one (409 while used)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy.orm import Session

from csra.settings import get_settings
from csra.specs import RETRIEVAL
from db.models import Model
from models_store.registry import find_model, jobs_using


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
    """Remove the row and its store folder; refused (409) while an unfinished job uses the model."""
    model = get_model_or_404(db, ref)
    if model.kind == RETRIEVAL:
        raise HTTPException(status_code=409, detail="'retrieval' is built in (the nearest approved answer of the "
                                                    "answer memory); it cannot be deleted")
    busy = jobs_using(db, model)
    if busy:
        raise HTTPException(status_code=409,
                            detail=f"model {model.name!r} is in use by unfinished job(s) {busy}; cancel them or wait")
    path = Path(model.path)
    store = get_settings().store_dir.resolve()
    db.delete(model)
    db.commit()
    if path.resolve().is_relative_to(store) and path.exists():
        shutil.rmtree(path, ignore_errors=True)
