"""Training and sweep jobs (``POST /jobs/train``, ``POST /jobs/sweep``)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import Admin, DbSession
from api.roles import RoleRoute
from api.schemas.estimates import SweepEstimate, TrainEstimate
from api.schemas.jobs import JobPublic
from api.schemas.training import SweepCreate, TrainRequest
from api.services.training import estimate_sweep, estimate_training, submit_sweep, submit_training
from db.models import Job

router = APIRouter(route_class=RoleRoute, prefix="/jobs", tags=["training"])


@router.post("/train", status_code=202, response_model=JobPublic | TrainEstimate,
             responses={200: {"model": TrainEstimate, "description": "dry_run: the estimate; no job was created"}})
def create_train_job(body: TrainRequest, db: DbSession, caller: Admin, response: Response) -> Job | TrainEstimate:
    """Fine-tune a base model on a dataset's train split (queue ``train``); ``dry_run``: estimate it first."""
    if body.dry_run:
        response.status_code = 200
        return estimate_training(db, body.spec())
    return submit_training(db, body.spec(), caller)


@router.post("/sweep", status_code=202, response_model=JobPublic | SweepEstimate,
             responses={200: {"model": SweepEstimate, "description": "dry_run: the estimate; no job was created"}})
def create_sweep_job(body: SweepCreate, db: DbSession, caller: Admin, response: Response) -> Job | SweepEstimate:
    """One child training job per config (run one after another on ``train``), then a leaderboard."""
    if body.dry_run:
        response.status_code = 200
        return estimate_sweep(db, body)
    return submit_sweep(db, body, caller)
