"""What every schema shares."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

OWNER_HELP = ("the name of the API key that made it (its owner); null when made while keys were off "
              "(only admins see those)")


class Public(BaseModel):
    """A response read from an ORM row."""

    model_config = ConfigDict(from_attributes=True)


class ErrorOut(BaseModel):
    """Every error answer: ``detail`` says what to change (a list of field errors for a 422 on a body)."""

    detail: str | list[dict[str, Any]]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses (all answered as ``ErrorOut``)."""
    return {code: {"model": ErrorOut, "description": ERROR_MEANINGS[code]} for code in codes}


ERROR_MEANINGS = {
    400: "the body could not be read as JSON (not UTF-8, or nested too deep)",
    401: "missing, wrong or revoked API key (when keys are on: CSRA_API_KEY is set)",
    403: "refused: an agent key on an admin route, a change with no API key configured from outside this machine, "
         "or a path outside the import folders",
    404: "not found",
    409: "conflicts with the current state (not ready, in use, already finished)",
    413: "request body over CSRA_MAX_REQUEST_KB (uploads: CSRA_MAX_UPLOAD_MB)",
    415: "the body is not JSON (POST /datasets: JSON or multipart/form-data)",
    422: "invalid input; detail names the field",
    502: "the job behind the answer failed",
    503: "the queue (Redis) is down; nothing was stored",
}
