"""The real daemon as a subprocess for tests: start, notify messages, drops, run records."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from conftest import chute_env, load_json, wait_for


class Daemon:
    """`chute daemon` on a spool, with a notify socket to know when it is ready."""

    def __init__(
        self,
        spool: Path,
        tmp: Path,
        config: str = "",
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ):
        self.spool = spool
        self.prefix = list(prefix)  # a command that runs it (it must exec, keeping the pid)
        self.tmp = tmp
        self.config = tmp / "chute.yaml"
        if "http:" not in config:  # a free port: test daemons run side by side
            config = ("" if config.strip() == "{}" else config) + "\nhttp: {listen: 127.0.0.1:0}\n"
        self.config.write_text(config)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []
        self.sock_path = str(tmp / f"notify-{time.monotonic_ns()}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.settimeout(0.05)
        self.log = tmp / "daemon.log"

    def start(self, wait_ready: bool = True) -> Daemon:
        env = chute_env({"NOTIFY_SOCKET": self.sock_path, **self.env})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "chute",
                    "daemon",
                    "--spool",
                    str(self.spool),
                    "--config",
                    str(self.config),
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        if wait_ready:
            self.wait_message("READY=1", timeout=30)
        return self

    def receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return
            self.messages.extend(data.decode().splitlines())

    def wait_message(self, text: str, timeout: float = 10) -> None:
        def seen() -> bool:
            self.receive()
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            return text in self.messages

        wait_for(f"{text} from the daemon", seen, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def close(self) -> None:
        """Stop a daemon the test left running as an operator would (SIGTERM, so it ends
        its tasks and removes their cgroups), with SIGKILL if that hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


@pytest.fixture
def daemon_factory(spool: Path, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(
        config: str = "", env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> Daemon:
        d = Daemon(spool, tmp_path, config, env, prefix)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def drop(spool: Path, name: str, text: str) -> Path:
    """Write the way users should: a dot-temp name, then one rename into incoming/."""
    incoming = spool / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f".{name}.tmp"
    tmp.write_text(text)
    final = incoming / name
    os.rename(tmp, final)
    return final


def job(name: str, run: str, extra: str = "") -> str:
    return (
        f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
        f"spec:\n  run: {run!r}\n{extra}"
    )


def runs_of(spool: Path, source: str | None = None) -> list[dict[str, Any]]:
    out = []
    runs = spool / "runs"
    if not runs.exists():
        return out
    for d in sorted(runs.iterdir()):
        if d.is_symlink() or d.name.startswith(".") or not (d / "run.json").exists():
            continue
        rec = load_json(d / "run.json")
        if source is None or rec["trigger"].get("source") == source:
            out.append(rec)
    return out


FINAL_RUN_STATES = ("succeeded", "failed", "cancelled", "interrupted")
OPEN_STATES = ("queued", "pending", "waiting", "running")


def assert_settled(run_dir: Path) -> dict[str, Any]:
    """The records of a run that is over agree with each other: run.json is final with its
    end time, and manifest.json (if the run got one) has no stage or shard left open, every
    attempt has ended (`finished_at`) and says why unless it succeeded, and each entry's
    `cores` are its last attempt's, as many as the stage's `cpus`. Returns run.json."""
    rec: dict[str, Any] = load_json(run_dir / "run.json")
    assert rec["state"] in FINAL_RUN_STATES, rec
    assert rec["finished_at"] is not None, rec
    if not (run_dir / "manifest.json").exists():
        return rec
    for stage in load_json(run_dir / "manifest.json")["stages"]:
        for entry in [stage, *stage["shards"]]:
            where = stage["name"] if entry is stage else f"{stage['name']}[{entry['index']}]"
            assert entry["state"] not in OPEN_STATES, (where, entry)
            for a in entry["attempts"]:
                assert a["finished_at"] is not None, (where, a)
                ok = a["exit_code"] == 0 and a["signal"] is None
                assert a["error"] is not None or ok, (where, a)
                assert len(a["cores"]) == stage["cpus"], (where, a)
            last = entry["attempts"][-1]["cores"] if entry["attempts"] else []
            assert entry["cores"] == last, (where, entry)
    return rec


def final_run(spool: Path, source: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        recs = [r for r in runs_of(spool, source) if r["state"] in FINAL_RUN_STATES]
        return recs[0] if recs else None

    result: dict[str, Any] = wait_for(f"a final run of {source}", done, timeout)
    return result


def http_address(spool: Path) -> str:
    """The daemon's bound HTTP address, as it wrote it into state/status.json."""

    def address() -> str | None:
        path = spool / "state" / "status.json"
        return load_json(path).get("http") if path.exists() else None

    result: str = wait_for("the http address in status.json", address)
    return result


def healthz(spool: Path) -> tuple[int, str]:
    """GET /healthz of the daemon whose address state/status.json holds: (status, body);
    (0, why) while there is none to ask (not started, restarting)."""
    try:
        addr = load_json(spool / "state" / "status.json").get("http")
    except (OSError, ValueError):
        return 0, "no status.json"
    if not addr:
        return 0, "no http address"
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)
