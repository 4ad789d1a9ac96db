"""Training and sweep jobs (``POST /jobs/train``, ``POST /jobs/sweep``)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import DbSession, Owner
from api.schemas.jobs import JobPublic
from api.schemas.training import SweepCreate
from api.services.training import submit_sweep, submit_training
from csra.specs import TrainSpec
from db.models import Job

router = APIRouter(prefix="/jobs", tags=["training"])


@router.post("/train", status_code=202, response_model=JobPublic)
def create_train_job(spec: TrainSpec, db: DbSession, owner: Owner) -> Job:
    """Fine-tune a base model on a dataset's train split (queue ``train``)."""
    return submit_training(db, spec, owner)


@router.post("/sweep", status_code=202, response_model=JobPublic)
def create_sweep_job(body: SweepCreate, db: DbSession, owner: Owner) -> Job:
    """One child training job per config (run one after another on ``train``), then a leaderboard."""
    return submit_sweep(db, body, owner)
