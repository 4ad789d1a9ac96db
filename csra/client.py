"""A small HTTP client for the csra API (used by the CLI, the UI and the benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from csra.settings import get_settings


class ApiError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> None:
        settings = get_settings()
        key = api_key if api_key is not None else settings.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url or settings.api_url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach the csra API at {self.http.base_url} ({e}); is `csra up` running?") from e
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ApiError(resp.status_code, detail)
        ctype = resp.headers.get("content-type", "")
        return resp.json() if ctype.startswith("application/json") else resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json=json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def import_file(self, path: Path, name: str | None = None, options: str | None = None) -> Any:
        with path.open("rb") as fh:
            data = {"name": name or path.stem}
            if options:
                data["options"] = options
            return self.request("POST", "/datasets", files={"file": (path.name, fh)}, data=data)
