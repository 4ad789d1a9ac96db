"""csra.client: error text, the unreachable-API message, polling until ``finished``, the SSE stream.

The HTTP layer is an ``httpx.MockTransport`` (a stub of the transport only: the client's own code
runs unchanged) or, for the socket-level cases, a tiny HTTP server in a thread.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from csra.client import ApiError, Client, format_detail, parse_sse

Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler) -> Client:
    return Client(base_url="http://api.test", api_key="", transport=httpx.MockTransport(handler))


def sse(*events: tuple[str, dict[str, object]]) -> bytes:
    """Events as sse-starlette writes them (CRLF line ends), with a ping comment first."""
    out = ": ping - 2026-01-01 00:00:00\r\n\r\n"
    for event, data in events:
        out += f"event: {event}\r\ndata: {json.dumps(data)}\r\n\r\n"
    return out.encode()


# ---------------------------------------------------------------------------- errors
def test_string_detail_is_the_error_text() -> None:
    c = client_for(lambda r: httpx.Response(404, json={"detail": "chat 9 not found"}))
    with pytest.raises(ApiError) as info:
        c.chat(9)
    assert info.value.status == 404
    assert info.value.detail == "chat 9 not found" == str(info.value)


def test_validation_list_reads_as_field_and_message() -> None:
    detail = [
        {"loc": ["body", "temperature"], "msg": "Input should be less than or equal to 2", "type": "x"},
        {"loc": ["query", "limit"], "msg": "Input should be greater than 0"},
        {"loc": ["body"], "msg": "Field required"},
        "something else",
    ]
    c = client_for(lambda r: httpx.Response(422, json={"detail": detail}))
    with pytest.raises(ApiError) as info:
        c.generate({"model_id": "baseline", "temperature": 3})
    assert info.value.status == 422
    assert info.value.detail == (
        "temperature: Input should be less than or equal to 2; limit: Input should be greater than 0; "
        "Field required; something else"
    )
    assert format_detail(detail) == info.value.detail


def test_error_without_json_body_keeps_the_text() -> None:
    c = client_for(lambda r: httpx.Response(502, text="Bad Gateway from the proxy"))
    with pytest.raises(ApiError) as info:
        c.models()
    assert (info.value.status, info.value.detail) == (502, "Bad Gateway from the proxy")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_says_how_to_start_it() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with Client(base_url=url, api_key="", timeout=5) as c, pytest.raises(ApiError) as info:
        c.jobs()
    assert info.value.status == 0
    assert info.value.detail.startswith(f"cannot reach the csra API at {url} (")
    assert info.value.detail.endswith("is `csra up` running?")


def test_api_key_is_sent_and_query_parameters_drop_unset_values() -> None:
    seen: list[httpx.Request] = []

    def handler(r: httpx.Request) -> httpx.Response:
        seen.append(r)
        return httpx.Response(200, json={"data": [], "count": 0})

    c = Client(base_url="http://api.test", api_key="k-123", transport=httpx.MockTransport(handler))
    assert c.jobs(kind="train", status=None) == []
    assert seen[0].headers["authorization"] == "Bearer k-123"
    assert dict(seen[0].url.params) == {"kind": "train", "limit": "100"}


def test_degraded_health_is_still_the_report() -> None:
    report = {"status": "degraded", "workers": {"generate": False}}
    assert client_for(lambda r: httpx.Response(503, json=report)).health() == report


def test_download_takes_the_file_name_from_the_response() -> None:
    c = client_for(lambda r: httpx.Response(
        200, content=b'{"a": 1}\n', headers={"content-disposition": 'attachment; filename="chat-7.jsonl"'}
    ))
    assert c.export_chat(7, "jsonl") == ("chat-7.jsonl", b'{"a": 1}\n')


# ---------------------------------------------------------------------------- polling
def test_poll_job_stops_at_the_first_finished_job() -> None:
    states = iter([
        {"id": 5, "status": "queued", "finished": False},
        {"id": 5, "status": "running", "finished": False},
        {"id": 5, "status": "succeeded", "finished": True},
    ])
    calls: list[str] = []

    def handler(r: httpx.Request) -> httpx.Response:
        calls.append(r.url.path)
        return httpx.Response(200, json=next(states))

    seen = [j["status"] for j in client_for(handler).poll_job(5, interval=0)]
    assert seen == ["queued", "running", "succeeded"]
    assert calls == ["/jobs/5"] * 3  # nothing asked after the finished one


def test_poll_job_follows_finished_not_the_status_name() -> None:
    # a status this client has never heard of ends the polling when the API says the job is finished
    jobs = iter([{"status": "running", "finished": False}, {"status": "expired", "finished": True}])
    polled = list(client_for(lambda r: httpx.Response(200, json=next(jobs))).poll_job(1, interval=0))
    assert [j["status"] for j in polled] == ["running", "expired"]


# ---------------------------------------------------------------------------- streaming
def test_parse_sse_fields_comments_and_multiline_data() -> None:
    lines = [": ping", "", "event: token", 'data: {"text": "a"}', "", "data: line 1", "data:line 2", "",
             "event: token", "data: unterminated"]
    assert list(parse_sse(lines)) == [("token", '{"text": "a"}'), ("message", "line 1\nline 2")]


DONE = {"id": 3, "status": "succeeded", "finished": True, "result": {"text": "Hi there"}}
EVENTS = [
    ("token", {"text": "Hel"}),
    ("reset", {"attempt": 2}),
    ("token", {"text": "Hi"}),
    ("token", {"text": " there"}),
    ("done", DONE),
]


def test_stream_job_yields_token_reset_done_across_chunk_boundaries() -> None:
    body = sse(*EVENTS)
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)]  # events and lines split anywhere

    def handler(r: httpx.Request) -> httpx.Response:
        assert r.url.path == "/jobs/3/stream"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))

    assert list(client_for(handler).stream_job(3)) == EVENTS


def test_stream_job_error_status_is_an_api_error() -> None:
    c = client_for(lambda r: httpx.Response(422, json={"detail": "job 4 is a train job; only generation jobs stream"}))
    with pytest.raises(ApiError) as info:
        list(c.stream_job(4))
    assert info.value.status == 422 and "only generation jobs stream" in info.value.detail


def test_stream_job_that_ends_without_done_is_an_error() -> None:
    body = sse(("token", {"text": "Hel"}))
    c = client_for(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body))
    stream = c.stream_job(6)
    assert next(stream) == ("token", {"text": "Hel"})
    with pytest.raises(ApiError, match="ended before the job did"):
        next(stream)


@pytest.fixture()
def sse_server() -> Iterator[str]:
    """A real HTTP server that writes the events a piece at a time, as the API does."""

    class Stream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for event in EVENTS:
                piece = sse(event)
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_stream_job_over_a_socket(sse_server: str) -> None:
    with Client(base_url=sse_server, api_key="", timeout=5) as c:
        assert list(c.stream_job(3)) == EVENTS
