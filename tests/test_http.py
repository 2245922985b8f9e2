"""The HTTP endpoint: health as a pure function, then a real daemon's socket."""

from __future__ import annotations

import errno
import http.client
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from chute.observe.http import HttpError, health, parse_listen, read_token
from daemon_proc import Daemon, daemon_factory, drop, final_run, http_address, job

__all__ = ["daemon_factory"]

TOKEN = "s3cret-token-0123456789"


def get(
    address: str, path: str, token: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# -- pure parts ------------------------------------------------------------------------------


def test_health_is_ok_while_the_loop_ticks() -> None:
    assert health(now=104.9, last_tick=100.0, longest_wait=1.0, write_error=None) is None


def test_a_wedged_loop_is_unhealthy_after_five_seconds() -> None:
    assert health(now=105.5, last_tick=100.0, longest_wait=1.0, write_error=None) == (
        "scheduling loop has not run for 5.5s (limit 5s)"
    )


def test_a_loop_with_long_waits_gets_twice_its_longest_wait() -> None:
    assert health(now=119.0, last_tick=100.0, longest_wait=10.0, write_error=None) is None
    assert health(now=121.0, last_tick=100.0, longest_wait=10.0, write_error=None) == (
        "scheduling loop has not run for 21.0s (limit 20s)"
    )


def test_a_full_disk_is_unhealthy_with_the_errno_text() -> None:
    err = OSError(errno.ENOSPC, "No space left on device", "/spool/runs/x/run.json")
    assert health(now=100.0, last_tick=100.0, longest_wait=1.0, write_error=err) == (
        "spool writes failing: /spool/runs/x/run.json: No space left on device (ENOSPC)"
    )


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:9842", ("127.0.0.1", 9842)), ("[::1]:0", ("::1", 0))],
    ids=["v4", "v6"],
)
def test_listen_addresses_parse(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


def test_a_listen_without_port_says_the_form() -> None:
    with pytest.raises(HttpError) as info:
        parse_listen("localhost")
    assert str(info.value) == (
        "http.listen: 'localhost' is not host:port (e.g. 127.0.0.1:9842, [::1]:9842)"
    )


def test_the_token_is_the_file_stripped_and_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token(path) == TOKEN
    assert read_token(None) is None
    path.write_text("\n")
    with pytest.raises(HttpError) as info:
        read_token(path)
    assert str(info.value) == (
        f"http.token_file {path}: the file is empty; put the token in it or remove http.token_file"
    )


# -- a real daemon ---------------------------------------------------------------------------


@pytest.fixture
def served(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> tuple[Daemon, str, Path]:
    """A daemon with a token file and two finished runs; its address and token file."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    d = daemon_factory(f"http: {{listen: '127.0.0.1:0', token_file: '{token_file}'}}\n").start()
    drop(spool, "one.yaml", job("one", "true"))
    assert final_run(spool, "incoming/one.yaml")["state"] == "succeeded"
    drop(spool, "two.yaml", job("two", "exit 1"))
    assert final_run(spool, "incoming/two.yaml")["state"] == "failed"
    return d, http_address(spool), token_file


def test_healthz_and_metrics_answer_without_a_token(served: tuple[Daemon, str, Path]) -> None:
    d, address, _ = served
    status, headers, body = get(address, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = get(address, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert b"chute_runs_finished_total" in body
    assert d.stop() == 0


def test_the_runs_api_needs_the_bearer_token(served: tuple[Daemon, str, Path]) -> None:
    d, address, _ = served
    status, headers, body = get(address, "/api/v1/runs")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="chute"'
    assert orjson.loads(body) == {
        "error": "missing or wrong bearer token; send Authorization: Bearer <token>"
    }
    wrong = "x" * len(TOKEN)
    assert get(address, "/api/v1/runs", wrong)[0] == 401
    assert get(address, "/api/v1/runs", TOKEN[:-1])[0] == 401
    status, headers, body = get(address, "/api/v1/runs", TOKEN)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    runs = orjson.loads(body)["runs"]
    assert [r["pipeline"] for r in runs] == ["two", "one"]  # newest first
    assert d.stop() == 0


def test_runs_filter_by_state_pipeline_and_limit(served: tuple[Daemon, str, Path]) -> None:
    d, address, _ = served

    def runs(query: str) -> list[Any]:
        status, _, body = get(address, f"/api/v1/runs?{query}", TOKEN)
        assert status == 200, body
        result: list[Any] = orjson.loads(body)["runs"]
        return result

    assert [r["pipeline"] for r in runs("state=failed")] == ["two"]
    assert [r["pipeline"] for r in runs("pipeline=one")] == ["one"]
    assert [r["pipeline"] for r in runs("limit=1")] == ["two"]
    assert runs("state=succeeded&pipeline=two") == []
    assert runs("state=stopped") == []  # a run the next start resumes: none here
    status, _, body = get(address, "/api/v1/runs?limit=0", TOKEN)
    assert (status, orjson.loads(body)) == (
        400,
        {"error": "limit: '0' is not a whole number from 1 to 1000"},
    )
    status, _, body = get(address, "/api/v1/runs?state=done", TOKEN)
    assert status == 400
    assert orjson.loads(body)["error"] == (
        "state: 'done' is not one of queued, running, stopped, succeeded, failed, cancelled, "
        "interrupted"
    )
    assert d.stop() == 0


def test_one_run_gives_its_record_and_manifest(
    spool: Path, served: tuple[Daemon, str, Path]
) -> None:
    d, address, _ = served
    rec = final_run(spool, "incoming/one.yaml")
    status, _, body = get(address, f"/api/v1/runs/{rec['run_id']}", TOKEN)
    assert status == 200
    doc = orjson.loads(body)
    assert doc["run"] == rec
    assert doc["manifest"]["run_id"] == rec["run_id"]
    assert [s["name"] for s in doc["manifest"]["stages"]] == ["one"]
    status, _, body = get(address, "/api/v1/runs/one%2Flatest", TOKEN)  # <pipeline>/latest
    assert (status, orjson.loads(body)["run"]) == (200, rec)
    assert d.stop() == 0


def test_unknown_runs_paths_and_methods(served: tuple[Daemon, str, Path]) -> None:
    d, address, _ = served
    status, headers, body = get(address, "/api/v1/runs/19990101_000000_000000", TOKEN)
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert orjson.loads(body)["error"].startswith("19990101_000000_000000: no such run (2 runs in")
    hint = (
        "give a run id (like 20261122_101500_a1b2c3), a prefix of one, latest, or <pipeline>/latest"
    )
    for ref in ("..%2f..%2fetc", "%2Fetc%2Flatest", "..", "one%2F..%2F..%2Flatest"):
        status, _, body = get(address, f"/api/v1/runs/{ref}", TOKEN)
        shown = ref.replace("%2f", "/").replace("%2F", "/")
        assert (status, orjson.loads(body)) == (404, {"error": f"{shown}: not a run; {hint}"})
    status, _, body = get(address, "/nope", TOKEN)
    assert (status, orjson.loads(body)) == (404, {"error": "/nope: no such endpoint"})
    status, headers, body = get(address, "/api/v1/runs", TOKEN, method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert orjson.loads(body) == {"error": "POST not allowed; this API is read-only (GET)"}
    assert get(address, "/healthz", method="DELETE")[0] == 405
    # a malformed request line is the standard library's 400, and the server goes on
    with socket.create_connection(tuple_of(address), timeout=5) as s:
        s.sendall(b"GET / extra HTTP/1.1\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 400")
    assert get(address, "/healthz")[0] == 200
    assert d.stop() == 0


def test_every_method_but_get_and_head_is_405_with_allow(served: tuple[Daemon, str, Path]) -> None:
    d, address, _ = served
    for method in ("BREW", "PROPFIND", "PUT", "DELETE", "OPTIONS", "TRACE"):
        for path in ("/healthz", "/metrics", "/api/v1/runs", "/nope"):
            status, headers, body = get(address, path, TOKEN, method=method)
            assert (status, headers["Allow"]) == (405, "GET, HEAD"), (method, path)
            assert orjson.loads(body)["error"].startswith(f"{method} not allowed"), (method, path)
    assert d.stop() == 0


def test_head_answers_like_get_without_a_body(served: tuple[Daemon, str, Path]) -> None:
    d, address, _ = served
    for path, token in (("/metrics", None), ("/healthz", None), ("/api/v1/runs", TOKEN)):
        status, headers, body = get(address, path, token, method="HEAD")
        full = get(address, path, token)
        assert (status, body) == (200, b""), path
        assert int(headers["Content-Length"]) > 0, path
        assert headers["Content-Type"] == full[1]["Content-Type"], path
    assert d.stop() == 0


def test_slow_clients_hold_no_thread_and_healthz_answers_at_once(
    served: tuple[Daemon, str, Path],
) -> None:
    """Slowloris: far more clients than handler threads, each with half a request head."""
    d, address, _ = served
    slow = [socket.create_connection(tuple_of(address), timeout=5) for _ in range(64)]
    try:
        for s in slow:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # the head is never finished
        for path, token, expected in (
            ("/healthz", None, 200),
            ("/metrics", None, 200),
            ("/api/v1/runs", TOKEN, 200),
        ):
            started = time.monotonic()
            assert get(address, path, token)[0] == expected, path
            assert time.monotonic() - started < 2.0, path
    finally:
        for s in slow:
            s.close()
    assert d.stop() == 0


@pytest.mark.slow
def test_a_request_gets_five_seconds_in_all_not_per_byte(
    served: tuple[Daemon, str, Path],
) -> None:
    """A client that sends one byte now and then is cut off when its request's time is up,
    with a 408; before, each byte bought another 5 s."""
    d, address, _ = served
    with socket.create_connection(tuple_of(address), timeout=10) as s:
        started = time.monotonic()
        answer = b""
        for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break  # closed on us: the deadline passed
            s.settimeout(0.5)
            try:
                answer += s.recv(1000)
            except TimeoutError:
                continue
            if answer:
                break
        while chunk := s.recv(1000):
            answer += chunk
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.0 408 Request Timeout"), answer
    assert 4.5 < took < 8.0
    assert d.stop() == 0


def test_an_oversized_head_is_431_and_the_server_goes_on(served: tuple[Daemon, str, Path]) -> None:
    d, address, _ = served
    with socket.create_connection(tuple_of(address), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 40_000)
        assert s.recv(100).startswith(b"HTTP/1.0 431")
    assert get(address, "/healthz")[0] == 200
    assert d.stop() == 0


def test_sighup_rereads_the_token_file(served: tuple[Daemon, str, Path]) -> None:
    d, address, token_file = served
    token_file.write_text("another-token\n")
    assert d.proc is not None
    d.messages.clear()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_message("READY=1")
    assert get(address, "/api/v1/runs", TOKEN)[0] == 401
    assert get(address, "/api/v1/runs", "another-token")[0] == 200
    token_file.write_text("")
    d.messages.clear()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_message("READY=1")
    assert get(address, "/api/v1/runs", "another-token")[0] == 200  # the old one stays
    assert d.stop() == 0
    assert (
        f"ERROR http.token_file {token_file}: the file is empty; put the token in it or "
        "remove http.token_file; keeping the previous token"
    ) in d.log.read_text()


def test_a_taken_port_is_one_error_line_and_exit_1(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory(f"http: {{listen: '127.0.0.1:{port}'}}\n").start(wait_ready=False)
        assert d.proc is not None
        assert d.proc.wait(timeout=30) == 1
    lines = d.log.read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines if " ERROR " in line] == [
        f"ERROR http.listen 127.0.0.1:{port}: cannot listen: Address already in use (errno 98); "
        "stop what holds the port or set http.listen to another host:port"
    ]
    d.proc = None


def tuple_of(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)
