"""The daemon's HTTP endpoint: /metrics, /healthz and the read-only runs API.

Owns: what each endpoint answers on `http.listen`, bearer-token checks, and the JSON
shape of /api/v1. Not here: connections, deadlines and threads (chute.observe.listener), the
metrics themselves (chute.observe.metrics), run folders' formats (chute.store.rundir), what
"healthy" watches (the daemon hands in a callable).
Threads: /healthz and /metrics are answered by the listener's event thread (no disk, no
token: they are served whatever other clients do); the API's requests run in handler
threads. Handlers only read: run folders from disk, the metrics registry (locked by
prometheus_client) and values the loop publishes whole (`waiting`: why each run not
started waits, chute.engine.reasons, replaced each second). GET and HEAD are the methods;
any other gets 405 with `Allow`.
Diagnostics: a bind failure or an unreadable token file raises HttpError with one line
naming the config key; the daemon logs it as an ERROR and exits non-zero. Requests are
logged at DEBUG only.
Limits: plain HTTP; put a TLS proxy in front to listen beyond localhost.
"""

from __future__ import annotations

import errno
import hmac
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from chute import __version__
from chute.engine.reasons import RunWait
from chute.observe.listener import Listener, Request, response
from chute.store import rundir
from chute.store.spool import Spool

log = logging.getLogger(__name__)

ALLOWED = ("GET", "HEAD")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
HEALTH_FLOOR = 5.0  # the loop may be quiet this long (or twice its longest wait) and be well


class HttpError(Exception):
    """The endpoint cannot start: a one-line message naming the config key."""


def health(
    now: float, last_tick: float, longest_wait: float, write_error: OSError | None
) -> str | None:
    """None when the daemon is well, else the one-line reason /healthz gives with its 503.

    Pure: `now` and `last_tick` are monotonic seconds; `longest_wait` is the most the loop
    ever waits between ticks; `write_error` is the committer's current failure, if any."""
    if write_error is not None:
        code = errno.errorcode.get(write_error.errno or 0, "?")
        where = write_error.filename or "the spool"
        return f"spool writes failing: {where}: {write_error.strerror} ({code})"
    limit = max(HEALTH_FLOOR, 2 * longest_wait)
    quiet = now - last_tick
    if quiet > limit:
        return f"scheduling loop has not run for {quiet:.1f}s (limit {limit:.0f}s)"
    return None


def read_token(path: Path | None) -> str | None:
    """The bearer token in http.token_file (surrounding whitespace stripped); None if unset."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise HttpError(
            f"http.token_file {path}: cannot read the token: {why}; "
            "fix the file or remove http.token_file"
        ) from None
    if not token:
        raise HttpError(
            f"http.token_file {path}: the file is empty; put the token in it "
            "or remove http.token_file"
        )
    return token


def parse_listen(listen: str, named: str = "http.listen") -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); HttpError says what is wrong, naming
    where the address was given (`named`)."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise HttpError(f"{named}: {listen!r} is not host:port (e.g. 127.0.0.1:9842, [::1]:9842)")
    return host, int(port)


def list_runs(
    spool: Spool, limit: int, state: str | None = None, pipeline: str | None = None
) -> list[Any]:
    """run.json of the newest runs first (run ids sort by creation), filtered."""
    out: list[Any] = []
    for run_id in reversed(rundir.run_ids(spool)):
        try:
            rec = rundir.read_json(spool.runs / run_id / "run.json")
        except (OSError, orjson.JSONDecodeError):
            continue  # being made, or removed by retention since the listing
        if state is not None and rec.get("state") != state:
            continue
        if pipeline is not None and rec.get("pipeline") != pipeline:
            continue
        out.append(rec)
        if len(out) >= limit:
            break
    return out


class Server(Listener):
    """The daemon's endpoint: the listener (chute.observe.listener) plus what the handlers read."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        spool: Spool,
        registry: CollectorRegistry,
        health: Callable[[], str | None],
        token: str | None,
    ) -> None:
        self.spool = spool
        self.registry = registry
        self.health = health
        self.token = token  # replaced whole on SIGHUP
        self.waiting: Mapping[str, RunWait] = {}  # replaced whole by the loop each second
        super().__init__(address, inline=self._inline, handle=self._handle)

    @property
    def address(self) -> str:
        host, port = self.server_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _inline(self, method: str, target: str) -> bytes | None:
        """/healthz and /metrics, answered by the listener's own thread: no token, no disk,
        so they are served whatever other clients do."""
        path = urlsplit(target).path.rstrip("/") or "/"
        if path not in ("/healthz", "/metrics"):
            return None
        if method not in ALLOWED:
            body = orjson.dumps(
                {"error": f"{method} not allowed on {path}; use GET"},
                option=orjson.OPT_APPEND_NEWLINE,
            )
            allow = {"Allow": ", ".join(ALLOWED)}
            return response(405, "Method Not Allowed", body, "application/json", False, allow)
        head_only = method == "HEAD"
        if path == "/metrics":
            return response(
                200, "OK", generate_latest(self.registry), CONTENT_TYPE_LATEST, head_only
            )
        reason = self.health()
        if reason is None:
            return response(200, "OK", b"ok\n", "text/plain; charset=utf-8", head_only)
        body = f"{reason}\n".encode()
        return response(503, "Service Unavailable", body, "text/plain; charset=utf-8", head_only)

    def _handle(self, request: Request) -> None:
        _Handler(request, request.address, self)  # type: ignore[arg-type]


def serve(
    listen: str,
    *,
    spool: Spool,
    registry: CollectorRegistry,
    health: Callable[[], str | None],
    token: str | None,
    named: str = "http.listen",
) -> Server:
    """Bind `listen` (not serving yet: call start()); HttpError names where it was given
    (`named`: http.listen, --listen or CHUTE_LISTEN)."""
    address = parse_listen(listen, named)
    try:
        return Server(address, spool=spool, registry=registry, health=health, token=token)
    except OSError as exc:
        hint = (
            f"stop what holds the port or set {named} to another host:port"
            if exc.errno == errno.EADDRINUSE
            else f"set {named} to an address of this machine"
        )
        raise HttpError(
            f"{named} {listen}: cannot listen: {exc.strerror} (errno {exc.errno}); {hint}"
        ) from None


class _Handler(BaseHTTPRequestHandler):
    """One request in a handler thread: the API's endpoints, which read run folders."""

    server: Server  # type: ignore[assignment]
    request: Request
    server_version = f"chute/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        self.connection = self.request.sock
        self.rfile = self.request.reader()
        self.wfile = self.request.writer()

    def handle(self) -> None:
        """One request, whatever its method (the standard library answers an unknown one
        501; here it is 405 with the methods allowed)."""
        self.close_connection = True
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536 or not self.parse_request():
            return
        if self.command in ALLOWED:
            self.do_GET()
        else:
            self._not_allowed()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if not self._authorized():
            self._json(
                HTTPStatus.UNAUTHORIZED,
                {"error": "missing or wrong bearer token; send Authorization: Bearer <token>"},
                {"WWW-Authenticate": 'Bearer realm="chute"'},
            )
            return
        if path == "/api/v1/runs":
            self._runs(url.query)
        elif path.startswith("/api/v1/runs/") and path.count("/") == 4:
            self._run(unquote(path.rsplit("/", 1)[1]))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"{url.path}: no such endpoint"})

    def _not_allowed(self) -> None:
        self._json(
            HTTPStatus.METHOD_NOT_ALLOWED,
            {"error": f"{self.command} not allowed; this API is read-only (GET)"},
            {"Allow": ", ".join(ALLOWED)},
        )

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), token.encode())

    def _runs(self, query: str) -> None:
        params = parse_qs(query)
        valid = {"limit", "state", "pipeline"}
        unknown = sorted(set(params) - valid)
        if unknown:
            self._json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"{unknown[0]}: unknown parameter (valid: limit, pipeline, state)"},
            )
            return
        limit_text = params.get("limit", [str(DEFAULT_LIMIT)])[-1]
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            self._json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"limit: {limit_text!r} is not a whole number from 1 to {MAX_LIMIT}"},
            )
            return
        state = params.get("state", [None])[-1]
        if state is not None and state not in rundir.RUN_STATES:
            self._json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"state: {state!r} is not one of {', '.join(rundir.RUN_STATES)}"},
            )
            return
        pipeline = params.get("pipeline", [None])[-1]
        runs = list_runs(self.server.spool, int(limit_text), state, pipeline)
        self._json(HTTPStatus.OK, {"runs": runs})

    def _run(self, ref: str) -> None:
        try:  # find_run checks the ref's form (chute.names) before it touches runs/
            folder = rundir.find_run(self.server.spool, ref)
            run = rundir.read_json(folder / "run.json")
        except rundir.UnknownRun as exc:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(exc)})
            return
        except (OSError, orjson.JSONDecodeError):
            self._json(HTTPStatus.NOT_FOUND, {"error": f"{ref}: no such run"})
            return
        try:
            manifest = rundir.read_json(folder / "manifest.json")
        except (OSError, orjson.JSONDecodeError):
            manifest = None  # not written yet (a queued run)
        wait = self.server.waiting.get(folder.name)
        self._json(
            HTTPStatus.OK,
            {"run": run, "manifest": manifest, "waiting": None if wait is None else wait.doc()},
        )

    def _json(self, status: HTTPStatus, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
        self._send(status, body, "application/json", headers)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s %s", self.address_string(), format % args)
