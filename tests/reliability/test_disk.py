"""Scenario 2: the spool's disk fills up while files keep arriving.

Pass: the daemon stays up, says so (an ERROR line, /healthz 503 with the reason, a metric),
loses no file, and catches up once space returns: every file dropped ends in exactly one
successful run.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from conftest import tmpfs, wait_for
from daemon_proc import Daemon, daemon_factory, final_run, job, runs_of

__all__ = ["daemon_factory"]


@pytest.fixture
def small_spool(spool: Path) -> Iterator[Path]:
    """The spool on its own 16 MiB tmpfs, so it can be filled without touching the host."""
    with tmpfs(spool, "size=16m"):
        yield spool


def fill(path: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    with open(path, "wb") as f, contextlib.suppress(OSError):
        block = b"\0" * (1 << 20)
        while True:
            f.write(block)
            f.flush()


def health(spool: Path) -> tuple[int, str]:
    try:
        status = orjson.loads((spool / "state" / "status.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return 0, "no status"
    addr = status.get("http")
    if not addr:
        return 0, "no http"
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_a_full_disk_loses_nothing_and_the_daemon_catches_up(
    small_spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    spool = small_spool
    d = daemon_factory("cpus: 2\nrescan_interval: 1s\nhttp: {listen: '127.0.0.1:0'}\n").start()
    staging = spool / "staging"
    staging.mkdir()
    for i in range(20):
        (staging / f"late{i}.yaml").write_text(job(f"late{i}", "echo hello"))
    (spool / "incoming" / ".early.tmp").write_text(job("early", "true"))
    os.rename(spool / "incoming" / ".early.tmp", spool / "incoming" / "early.yaml")
    assert final_run(spool, "incoming/early.yaml")["state"] == "succeeded"

    filler = spool / "filler"
    fill(filler)
    for i in range(20):  # a rename needs no free blocks: drops keep arriving on a full disk
        os.rename(staging / f"late{i}.yaml", spool / "incoming" / f"late{i}.yaml")
    wait_for("the daemon to report the full disk", lambda: "No space left" in d.log.read_text(), 30)
    assert d.proc is not None
    assert d.proc.poll() is None
    code, _ = health(spool)
    if code:  # the HTTP endpoint is up: it must say why it is unhealthy
        wait_for("healthz to say 503", lambda: health(spool)[0] == 503, 15)
        assert "No space left" in health(spool)[1] or "ENOSPC" in health(spool)[1]
    # Nothing is lost: each late file is still in incoming/, claimed in state/intake/, or run.
    for i in range(20):
        name = f"late{i}.yaml"
        places = [
            (spool / "incoming" / name).exists(),
            any(p.name.endswith(f"__{name}") for p in (spool / "state" / "intake").iterdir()),
            bool(runs_of(spool, f"incoming/{name}")),
        ]
        assert any(places), name

    filler.unlink()
    for i in range(20):
        rec = final_run(spool, f"incoming/late{i}.yaml", timeout=60)
        assert rec["state"] == "succeeded", rec
        assert len(runs_of(spool, f"incoming/late{i}.yaml")) == 1
    if code:
        wait_for(f"healthz to recover (last: {health(spool)})", lambda: health(spool)[0] == 200, 15)
    assert d.stop() == 0
