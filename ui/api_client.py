"""The UI's only way to the csra API: small HTTP calls (httpx), no business logic.

Every failure is an :class:`ApiError` carrying the API's ``detail`` text, which the UI shows
as a ``gr.Error``. Nothing here touches the network until a method is called.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import httpx

from csra.settings import get_settings

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def format_detail(detail: Any) -> str:
    """FastAPI's ``detail``: a string, or a list of validation errors (``loc``, ``msg``)."""
    if isinstance(detail, list):
        parts = []
        for d in detail:
            if isinstance(d, dict):
                loc = ".".join(str(p) for p in d.get("loc", []) if p not in ("body", "query"))
                parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
            else:
                parts.append(str(d))
        return "; ".join(parts)
    return str(detail)


class ApiClient:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0
    ) -> None:
        settings = get_settings()
        self.base_url = (base_url or settings.api_url).rstrip("/")
        key = api_key if api_key is not None else settings.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ transport
    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise ApiError(0, f"the csra API at {self.base_url} did not answer in time ({e})") from e
        except httpx.TransportError as e:
            raise ApiError(
                0, f"cannot reach the csra API at {self.base_url} ({e}); is `csra up` running?"
            ) from e
        if resp.status_code >= 400:
            try:
                detail = format_detail(resp.json().get("detail", resp.text))
            except (ValueError, AttributeError):
                detail = resp.text or resp.reason_phrase
            raise ApiError(resp.status_code, detail)
        return resp

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._send(method, path, **kwargs)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v not in (None, "")})

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, json=body)

    def download(self, path: str, **params: Any) -> tuple[str, bytes]:
        """A file the API serves: (file name from Content-Disposition, content)."""
        resp = self._send(
            "GET",
            path,
            params={k: v for k, v in params.items() if v not in (None, "")},
            follow_redirects=True,
        )
        m = re.search(r'filename="?([^";]+)"?', resp.headers.get("content-disposition", ""))
        name = m.group(1) if m else path.rstrip("/").rsplit("/", 1)[-1]
        return name, resp.content

    # ------------------------------------------------------------------ endpoints
    def health(self) -> dict[str, Any]:
        try:
            return self.get("/health")
        except ApiError as e:
            if e.status == 503:  # degraded: the body is still the health report
                return {"status": "degraded", "detail": e.detail}
            raise

    def models(self) -> list[dict[str, Any]]:
        return self.get("/models")["data"]

    def datasets(self) -> list[dict[str, Any]]:
        return self.get("/datasets")["data"]

    def import_dataset(self, path: str, name: str) -> dict[str, Any]:
        with open(path, "rb") as fh:
            return self.call(
                "POST", "/datasets", files={"file": (path.rsplit("/", 1)[-1], fh)}, data={"name": name}
            )

    def jobs(
        self, kind: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return self.get("/jobs", kind=kind, status=status, limit=limit)["data"]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.get(f"/jobs/{int(job_id)}")

    def job_events(self, job_id: int, kind: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        return self.get(f"/jobs/{int(job_id)}/events", kind=kind, after=after or None, limit=10000)["data"]

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        return self.post(f"/jobs/{int(job_id)}/cancel")

    def train(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.post("/jobs/train", body)

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.post("/jobs/generate", body)

    def evaluate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.post("/jobs/evaluate", body)

    def evaluation(self, evaluation_id: int) -> dict[str, Any]:
        return self.get(f"/evaluations/{int(evaluation_id)}")

    def evaluations(self, dataset_id: int | None = None) -> list[dict[str, Any]]:
        return self.get("/evaluations", dataset_id=dataset_id)["data"]

    def leaderboard(self, dataset_id: int) -> list[dict[str, Any]]:
        return self.get("/leaderboard", dataset_id=int(dataset_id))["data"]

    def evaluation_file(self, evaluation_id: int, name: str) -> bytes:
        return self.download(f"/evaluations/{int(evaluation_id)}/{name}")[1]

    def chats(self, limit: int = 200) -> list[dict[str, Any]]:
        return self.get("/chats", limit=limit)["data"]

    def chat(self, chat_id: int) -> dict[str, Any]:
        return self.get(f"/chats/{int(chat_id)}")

    def create_chat(self, title: str, settings: dict[str, Any]) -> dict[str, Any]:
        return self.post("/chats", {"title": title, "settings": settings})

    def delete_chat(self, chat_id: int) -> None:
        self.call("DELETE", f"/chats/{int(chat_id)}")

    def post_message(self, chat_id: int, body: dict[str, Any]) -> dict[str, Any]:
        return self.post(f"/chats/{int(chat_id)}/messages", body)

    def feedback(
        self, chat_id: int, message_id: int, rating: str, corrected_reply: str | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"rating": rating}
        if corrected_reply:
            body["corrected_reply"] = corrected_reply
        return self.post(f"/chats/{int(chat_id)}/messages/{int(message_id)}/feedback", body)

    def export_chat(self, chat_id: int, fmt: str) -> tuple[str, bytes]:
        return self.download(f"/chats/{int(chat_id)}/export", format=fmt)

    def export_chats(self, fmt: str, since: str | None = None, model: str | None = None) -> tuple[str, bytes]:
        return self.download("/chats/export", format=fmt, since=since, model=model)

    def profile(self) -> dict[str, Any]:
        return self.get("/profile")

    def save_profile(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("PUT", "/profile", json=body)


_client: ApiClient | None = None
_lock = threading.Lock()


def client() -> ApiClient:
    """The process-wide client, made on first use (never at import time)."""
    global _client
    with _lock:
        if _client is None:
            _client = ApiClient()
        return _client
