"""Shared fixtures: a temporary spool, the real `chute` CLI as a subprocess, leak checks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "spool" / "examples"
sys.path.insert(0, str(REPO / "daemon"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# multiprocessing's forkserver (the call: pool of in-process executors) does not inherit
# sys.path: without this its workers would import chute from wherever it is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO / "daemon"), os.environ.get("PYTHONPATH")) if p
)


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (mount -o `options`) for the test; skips the test where it
    cannot be mounted (not root, no mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@dataclass
class Done:
    code: int
    out: str
    err: str


Chute = Callable[..., Done]  # the `chute` fixture


def chute_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUTE_")}
    env["PYTHONPATH"] = str(REPO / "daemon") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JOURNAL_STREAM", None)
    env.update(extra or {})
    return env


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    root.mkdir()
    return root


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> Path:
    """A 2-socket 128-core /sys tree: node0 0-63, node1 64-127, 128 GiB each."""
    from fake_sysfs import build_fake_sysfs

    return build_fake_sysfs(tmp_path)


@pytest.fixture
def chute(spool: Path) -> Chute:
    """Run `chute ARGS --spool <spool>` as a real process (after `prefix`, a command that
    runs it: `setpriv ...`); returns its code and output."""

    def run(
        *args: str,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> Done:
        cmd = [*prefix, sys.executable, "-m", "chute", *args, "--spool", str(spool)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=chute_env(env))
        return Done(p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def load_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy; fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def spool_cgroups(folder: Path) -> list[Path]:
    """The cgroups chute would make for spools at `folder` or one level below it (this
    process's group is where a daemon or `chute run` started by a test makes them)."""
    from chute.execution import cgroups

    base = cgroups.base(leaf=False)
    if base is None:
        return []
    candidates = [folder, *(p for p in folder.iterdir() if p.is_dir())]
    return [base / cgroups.spool_group(p) for p in candidates if (p / "state").is_dir()]


@pytest.fixture(autouse=True)
def no_leaked_cgroups(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a cgroup of one of its spools behind (after killing what is
    in it and removing it, so the next test starts clean)."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    from chute.execution import cgroups

    tmp: Path = request.getfixturevalue("tmp_path")
    yield
    deadline = time.monotonic() + 5
    while left := [g for g in spool_cgroups(tmp) if g.exists()]:
        if time.monotonic() > deadline:
            for group in left:
                cgroups.kill(group)
                cgroups.wait_empty([group], time.monotonic() + 5)
                cgroups.remove_tree(group)
            pytest.fail(f"test left cgroups behind: {left}")
        time.sleep(0.05)


def _reap_orphans(me: psutil.Process) -> None:
    """Reap the zombies among this process's children. Once an in-process executor has made
    pytest a subreaper, what a daemon killed with -9 left (its forkserver, workers, resource
    tracker) is reparented here when it exits; nobody else waits for it. The test's own
    children were waited for by its fixtures, which end before this one."""
    for child in me.children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves child processes or threads behind (watchdog's model)."""
    threads = set(threading.enumerate())
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 5
    while True:
        kids = [c for c in me.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
        extra = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        if not kids and not extra:
            _reap_orphans(me)
            return
        if time.monotonic() > deadline:
            for c in kids:
                c.kill()
            pytest.fail(f"test leaked processes {kids} / threads {extra}")
        time.sleep(0.05)
