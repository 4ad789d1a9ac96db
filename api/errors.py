"""Turning validation errors into JSON ``detail`` a person can act on."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from pydantic import ValidationError


def errors_detail(errors: list[Any]) -> list[dict[str, Any]]:
    """Pydantic errors as plain JSON (``ctx`` may hold exception objects, which JSON cannot)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def unprocessable(e: ValidationError, prefix: str = "") -> HTTPException:
    detail: Any = errors_detail(e.errors())
    if prefix:
        detail = f"{prefix}: " + "; ".join(
            f"{'.'.join(map(str, d['loc']))}: {d['msg']}" if d["loc"] else d["msg"] for d in detail)
    return HTTPException(status_code=422, detail=detail)
