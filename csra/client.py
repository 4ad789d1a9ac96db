"""The one HTTP client for the csra API, used by the CLI (``csra.cli``) and the UI (``ui``).

Every failure is an :class:`ApiError` whose ``detail`` is a sentence a person can act on (the
API's own ``detail``, or why the API could not be reached). Nothing touches the network until a
method is called.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from csra.settings import get_settings

DRY_RUN_TIMEOUT = 330.0  # seconds: the longest calibration wait a deployment may set, and a margin
EVENTS_PAGE = 500  # the most events GET /jobs/{id}/events answers in one call


class ApiError(Exception):
    """A call that failed: ``status`` is the HTTP status (0: no answer), ``detail`` readable text."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = format_detail(detail)
        super().__init__(self.detail)


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


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Server-sent events as (event, data) from the response's lines.

    Written here because no SSE client library is installed (httpx-sse is not a dependency).
    It covers what the API sends: ``event:`` and ``data:`` fields (repeated ``data:`` lines are
    joined with newlines), comments such as ``: ping``, and the blank line that ends an event.
    """
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def _raise_for_status(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        detail = resp.text or resp.reason_phrase
    raise ApiError(resp.status_code, detail)


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """Query parameters without the unset ones."""
    return {k: v for k, v in params.items() if v is not None and v != ""}


class Client:
    """Calls to the API at ``base_url`` (default ``CSRA_API_URL``), with ``CSRA_API_KEY`` if set."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if base_url is None or api_key is None:
            settings = get_settings()
            base_url = base_url or settings.api_url
            api_key = api_key if api_key is not None else settings.api_key
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ transport
    @contextmanager
    def _answered(self) -> Iterator[None]:
        """No answer from the API (refused, timed out, cut off) becomes ``ApiError(0, ...)``."""
        try:
            yield
        except httpx.TimeoutException as e:
            raise ApiError(0, f"the csra API at {self.base_url} did not answer in time ({e})") from e
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach the csra API at {self.base_url} ({e}); is `csra up` running?") from e

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response to a request, or an :class:`ApiError`."""
        with self._answered():
            resp = self.http.request(method, path, **kwargs)
        _raise_for_status(resp)
        return resp

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded answer: JSON, text, or None when there is no body."""
        resp = self.send(method, path, **kwargs)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=_params(params))

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json=json)

    def put(self, path: str, json: Any = None) -> Any:
        return self.request("PUT", path, json=json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def download(self, path: str, **params: Any) -> tuple[str, bytes]:
        """A file the API serves: (file name from Content-Disposition, content)."""
        resp = self.send("GET", path, params=_params(params), follow_redirects=True)
        m = re.search(r'filename="?([^";]+)"?', resp.headers.get("content-disposition", ""))
        return (m.group(1) if m else path.rstrip("/").rsplit("/", 1)[-1]), resp.content

    # ------------------------------------------------------------------ jobs
    def jobs(
        self, kind: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return self.get("/jobs", kind=kind, status=status, limit=limit)["data"]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.get(f"/jobs/{int(job_id)}")

    def job_events(
        self, job_id: int, kind: str | None = None, after: int = 0, limit: int = 10000
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` events after ``after``, fetched in pages (the API answers at most 500 a call)."""
        events: list[dict[str, Any]] = []
        while len(events) < limit:
            page = self.get(f"/jobs/{int(job_id)}/events", kind=kind, after=after or None,
                            limit=min(EVENTS_PAGE, limit - len(events)))["data"]
            events += page
            if len(page) < EVENTS_PAGE:
                break
            after = page[-1]["id"]
        return events

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        return self.post(f"/jobs/{int(job_id)}/cancel")

    def poll_job(self, job_id: int, interval: float = 1.0) -> Iterator[dict[str, Any]]:
        """The job every ``interval`` seconds; the last one yielded is the first that is ``finished``."""
        while True:
            job = self.job(job_id)
            yield job
            if job["finished"]:
                return
            time.sleep(interval)

    def stream_job(self, job_id: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """A generation job's server-sent events (``GET /jobs/{id}/stream``) as (event, data).

        ``token`` {"text"}: the next piece of the reply; ``reset`` {"attempt"}: a retried attempt
        restarts the reply, so drop the text so far; ``done`` (the job): the last event.
        """
        with self._answered(), self.http.stream("GET", f"/jobs/{int(job_id)}/stream") as resp:
            if resp.status_code >= 400:
                resp.read()
                _raise_for_status(resp)
            for event, data in parse_sse(resp.iter_lines()):
                yield event, json.loads(data)
                if event == "done":
                    return
        raise ApiError(0, f"the stream of job {job_id} ended before the job did (GET /jobs/{job_id} has its state)")

    # ------------------------------------------------------------------ submitting work
    def _submit(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A job submission; a dry run may wait for the train worker's calibration (CSRA_ESTIMATE_WAIT_SECONDS,
        at most 300 s), so it is given longer than other calls."""
        timeout = DRY_RUN_TIMEOUT if body.get("dry_run") else httpx.USE_CLIENT_DEFAULT
        result: dict[str, Any] = self.request("POST", path, json=body, timeout=timeout)
        return result

    def train(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._submit("/jobs/train", body)

    def sweep(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._submit("/jobs/sweep", body)

    def evaluate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._submit("/jobs/evaluate", body)

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.post("/jobs/generate", body)

    # ------------------------------------------------------------------ health, datasets, models
    def export_model(self, ref: str, body: dict[str, Any]) -> dict[str, Any]:
        """Queue a GGUF export of a model (``POST /models/{ref}/export``): the job."""
        return self.post(f"/models/{ref}/export", json=body)

    def me(self) -> dict[str, Any]:
        """The name and role of this client's key (``GET /me``)."""
        return self.get("/me")

    def health(self) -> dict[str, Any]:
        """The health report; a degraded stack answers 503 with the same report."""
        with self._answered():
            resp = self.http.get("/health")
        if resp.status_code == 503:
            try:
                report = resp.json()
            except ValueError:
                report = None
            if isinstance(report, dict) and "status" in report:
                return report
        _raise_for_status(resp)
        return resp.json()

    def datasets(self) -> list[dict[str, Any]]:
        return self.get("/datasets")["data"]

    def dataset(self, dataset_id: int) -> dict[str, Any]:
        return self.get(f"/datasets/{int(dataset_id)}")

    def import_file(self, path: str | Path, name: str | None = None, options: str | None = None) -> dict[str, Any]:
        """Upload a CSV, JSONL or Parquet file as a new dataset: {dataset, job}."""
        path = Path(path)
        data = {"name": name or path.stem}
        if options:
            data["options"] = options
        with path.open("rb") as fh:
            return self.request("POST", "/datasets", files={"file": (path.name, fh)}, data=data)

    def import_source(self, source: str, name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """A dataset read on the server (a path there or a Hugging Face dataset id): {dataset, job}."""
        body: dict[str, Any] = {"name": name, "source": source}
        if options:
            body["options"] = options
        return self.post("/datasets", body)

    def models(self) -> list[dict[str, Any]]:
        return self.get("/models")["data"]

    def model(self, ref: str) -> dict[str, Any]:
        return self.get(f"/models/{ref}")

    def set_reply_settings(self, ref: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Replace a grounded model's reply settings (``PUT /models/{ref}/reply-settings``): the model."""
        return self.put(f"/models/{ref}/reply-settings", json=settings)

    # ------------------------------------------------------------------ the answer memory
    def memory(self) -> dict[str, Any]:
        """How many approved answers, by source, from which datasets."""
        return self.get("/memory")

    def memory_search(self, query: str, k: int = 5) -> dict[str, Any]:
        return self.get("/memory/search", q=query, k=k)

    def memory_entries(self, source: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of the live entries: {data, count}."""
        return self.get("/memory/entries", source=source, limit=limit, offset=offset)

    def remove_memory_entry(self, entry_id: int) -> None:
        self.delete(f"/memory/entries/{int(entry_id)}")

    def rebuild_memory(self, dataset_id: int) -> dict[str, Any]:
        """The job that (re)builds the memory's answers of a dataset's train split."""
        return self.post("/memory/rebuild", {"dataset_id": int(dataset_id)})

    # ------------------------------------------------------------------ evaluations
    def evaluation(self, evaluation_id: int) -> dict[str, Any]:
        return self.get(f"/evaluations/{int(evaluation_id)}")

    def evaluations(self, dataset_id: int | None = None) -> list[dict[str, Any]]:
        return self.get("/evaluations", dataset_id=dataset_id)["data"]

    def leaderboard(self, dataset_id: int) -> list[dict[str, Any]]:
        return self.get("/leaderboard", dataset_id=int(dataset_id))["data"]

    def evaluation_examples(self, evaluation_id: int, **filters: Any) -> dict[str, Any]:
        """A page of its stored predictions with their scores (``model``, ``pattern``, ``intent``, ``sort``,
        ``limit``, ``offset``): {data, count}."""
        return self.get(f"/evaluations/{int(evaluation_id)}/examples", **filters)

    def evaluation_file(self, evaluation_id: int, name: str) -> bytes:
        """A file of the evaluation (``metrics.png``, ``report.html``...)."""
        return self.download(f"/evaluations/{int(evaluation_id)}/{name}")[1]

    # ------------------------------------------------------------------ chats and profile
    def chats(self, limit: int = 200) -> list[dict[str, Any]]:
        return self.get("/chats", limit=limit)["data"]

    def chat(self, chat_id: int) -> dict[str, Any]:
        return self.get(f"/chats/{int(chat_id)}")

    def create_chat(self, title: str, settings: dict[str, Any]) -> dict[str, Any]:
        return self.post("/chats", {"title": title, "settings": settings})

    def delete_chat(self, chat_id: int) -> None:
        self.delete(f"/chats/{int(chat_id)}")

    def post_message(self, chat_id: int, body: dict[str, Any]) -> dict[str, Any]:
        """The user turn is stored; the answer is the job that writes the assistant turn."""
        return self.post(f"/chats/{int(chat_id)}/messages", body)

    def feedback(
        self, chat_id: int, message_id: int, rating: str, corrected_reply: str | None = None
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
        return self.put("/profile", body)


def memory_entry_source(entry: dict[str, Any]) -> str:
    """Where an answer of ``GET /memory/entries`` or ``/memory/search`` came from, as the UI and the CLI
    show it: ``chat reply #12`` (approved in a chat), ``dataset #2`` (a dataset's train split)."""
    if entry["source"] == "chat":
        return f"chat reply #{entry['chat_message_id']}" if entry.get("chat_message_id") else "chat"
    return f"dataset #{entry['dataset_id']}" if entry.get("dataset_id") else str(entry["source"])
