"""Intake: each dropped file ends exactly once in a run, a schedule or rejected/.

Real files in a temporary spool, real inotify; the only fake is the clock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import resource
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import watchdog.observers.inotify_c  # noqa: F401  (imported before fds run out in one test)

from chute.clock import Clock
from chute.config import Config
from chute.intake import access
from chute.intake.decision import Accepted, Outcome, Scheduled
from chute.intake.drops import Intake
from chute.intake.filenames import file_id, is_candidate
from chute.intake.rejections import Rejected
from chute.intake.watch import Watcher
from chute.store import atomic, rundir
from chute.store.spool import Spool
from conftest import load_json, wait_for

NOW = datetime(2026, 11, 22, 10, 15, 0, tzinfo=UTC)
NOW_TEXT = "2026-11-22T10:15:00.000Z"
RUN_ID = "20261122_101500_abcdef"
ALICE = "chute-test-alice"

JOB = b"""apiVersion: chute/v1
kind: Job
metadata:
  name: hello
spec:
  run: echo hi
"""

EVERY_HOUR = b"""apiVersion: chute/v1
kind: Job
metadata:
  name: every-hour
spec:
  schedule:
    every: 1h
  run: echo hi
"""

BAD = b"""apiVersion: chute/v1
kind: Job
metadata:
  name: bad
spec:
  run: echo hi
  cpus: 0
  timeout: soon
"""

BAD_ERRORS = [
    {"path": "spec.cpus", "line": 7, "message": "0 is out of range; expected an integer ≥ 1"},
    {
        "path": "spec.timeout",
        "line": 8,
        "message": "'soon' is not a duration like 500ms, 30s, 20m, 1h or 2d",
    },
]


class FixedClock(Clock):
    def now(self) -> datetime:
        return NOW


def new_intake(root: Spool, **config: Any) -> Intake:
    return Intake(root, Config(**config), node_cpus=2, node_memory=1 << 30, clock=FixedClock())


@pytest.fixture
def root(spool: Path) -> Spool:
    s = Spool(root=spool, runs=spool / "runs")
    s.ensure()
    return s


@pytest.fixture
def make_intake(root: Spool) -> Callable[..., Intake]:
    def make(**config: Any) -> Intake:
        return new_intake(root, **config)

    return make


@pytest.fixture
def intake(make_intake: Callable[..., Intake]) -> Intake:
    return make_intake()


@pytest.fixture
def drop(root: Spool, tmp_path: Path) -> Callable[..., Path]:
    """Drop a file the right way: write it elsewhere, then rename it into incoming/."""
    outside = tmp_path / "outside"
    outside.mkdir()

    def put(name: str, data: bytes = JOB, mode: int = 0o644) -> Path:
        tmp = outside / "drop.tmp"
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        target = root.incoming / name
        os.rename(tmp, target)
        return target

    return put


@pytest.fixture
def watcher(root: Spool) -> Any:
    w = Watcher(root)
    yield w
    w.close()


@pytest.fixture(scope="session")
def alice() -> pwd.struct_passwd:
    """A second local user, created once (root and useradd needed)."""
    try:
        return pwd.getpwnam(ALICE)
    except KeyError:
        pass
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating the user chute-test-alice needs root and useradd")
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", ALICE],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(ALICE)


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def error_json(root: Spool, file: str) -> Any:
    """rejected/<file>.error.json, less its file_id, which must be the rejected file's."""
    doc = load_json(root.rejected / f"{file}.error.json")
    if isinstance(doc, dict) and "reason" in doc:
        assert doc.pop("file_id") == file_id(os.lstat(root.rejected / file))
    return doc


def file_issue(name: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "file": name,
        "reason": reason,
        "errors": [{"path": "", "line": 0, "message": message}],
        "rejected_at": NOW_TEXT,
    }


def refused(file: str, reason: str, message: str) -> Rejected:
    """A rejection of the file as a whole (line 0, no field path)."""
    return Rejected(file, reason, [{"path": "", "line": 0, "message": message}])


def read_events(
    w: Watcher, what: str, done: Callable[[list[str], list[str], bool], bool], timeout: float = 5
) -> tuple[list[str], list[str], bool]:
    """Read the watcher in a select loop until `done` holds for everything read so far."""
    ready: list[str] = []
    deleted: list[str] = []
    overflowed = False
    deadline = time.monotonic() + timeout
    while not done(ready, deleted, overflowed):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out after {timeout}s waiting for {what}: got {ready} {deleted}")
        if select.select([w.fileno()], [], [], left)[0]:
            r, d, o = w.read()
            ready += r
            deleted += d
            overflowed = overflowed or o
    return ready, deleted, overflowed


def take(intake: Intake, *dropped: str) -> list[Outcome]:
    """Take names of incoming/ as the daemon does (chute.daemon.admission): claim them, decide
    them in one group commit, make the new runs durable, then release their claims."""
    outcomes, handover = intake.decide_many(intake.claim_many(dropped))
    if handover is not None:
        handover.unsynced.sync()
        intake.release(handover)
    return outcomes


def rescan(intake: Intake) -> list[Outcome]:
    """A rescan as the daemon makes one: the claims a failed handover left, then every
    candidate name in incoming/."""
    return intake.redo_claims() + take(intake, *intake.incoming_names())


# -- accepting -----------------------------------------------------------------------------


def test_a_deferred_handover_is_handed_once_even_if_a_rescan_sees_its_claim(
    root: Spool, intake: Intake, drop: Callable[..., Path]
) -> None:
    """The daemon's path: the run folder is in place, its sync still in the writer thread;
    a rescan meanwhile (inotify overflowed) must not finish the claim and hand it over again."""
    for name in ("a.yaml", "b.yaml"):
        drop(name)
    outcomes, handover = intake.decide_many(intake.claim_many(["a.yaml", "b.yaml"]))
    assert handover is not None
    assert [o.run_id for o in outcomes if isinstance(o, Accepted)] == [
        a.run_id for a in handover.accepted
    ]
    assert len(names(root.state / "intake")) == 2  # claims kept until the runs are durable
    assert intake.redo_claims() == []
    assert rescan(intake) == []
    handover.unsynced.sync()
    intake.release(handover)
    assert names(root.state / "intake") == []
    assert sorted(names(root.queue)) == sorted(f"{a.run_id}.yaml" for a in handover.accepted)
    assert rescan(intake) == []


def test_one_shot_file_becomes_a_queued_run_and_leaves_incoming(
    root: Spool, intake: Intake, drop: Callable[..., Path]
) -> None:
    path = drop("job.yaml")
    dropped = os.stat(path).st_ctime
    identity = file_id(os.stat(path))

    [out] = take(intake, "job.yaml")

    assert isinstance(out, Accepted)
    assert out.source == "incoming/job.yaml"
    assert out.spec_bytes == JOB
    assert out.pipeline.name == "hello"
    assert out.accepted_at == NOW
    assert out.dropped_at == dropped
    assert out.submitted_by == {"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name}
    assert out.run_id.startswith("20261122_101500_")
    run = load_json(root.runs / out.run_id / "run.json")
    assert run["state"] == "queued"
    assert run["trigger"] == {"type": "drop", "source": "incoming/job.yaml", "file_id": identity}
    assert run["submitted_by"] == out.submitted_by
    assert run["created_at"] == NOW_TEXT
    assert run["run_date"] == NOW.astimezone().date().isoformat()
    assert (root.runs / out.run_id / "spec.yaml").read_bytes() == JOB
    assert names(root.queue) == [f"{out.run_id}.yaml"]
    assert (root.queue / f"{out.run_id}.yaml").read_bytes() == JOB
    assert names(root.incoming) == []
    assert names(root.state / "intake") == []
    assert names(root.rejected) == []


def test_recurring_file_goes_to_schedules_and_one_of_the_same_name_replaces_it(
    root: Spool, intake: Intake, drop: Callable[..., Path]
) -> None:
    drop("hourly.yaml", EVERY_HOUR)
    [first] = take(intake, "hourly.yaml")
    assert isinstance(first, Scheduled)
    assert (first.name, first.path, first.replaced) == (
        "every-hour",
        root.schedules / "every-hour.yaml",
        False,
    )
    assert first.accepted_at == NOW

    second_bytes = EVERY_HOUR.replace(b"every: 1h", b"every: 2h")
    identity = file_id(os.stat(drop("hourly-v2.yml", second_bytes)))
    [second] = take(intake, "hourly-v2.yml")

    assert isinstance(second, Scheduled)
    assert second.replaced is True
    assert second.pipeline.schedule is not None
    assert second.pipeline.schedule.every == 7200.0
    assert names(root.schedules) == ["every-hour.yaml"]
    assert (root.schedules / "every-hour.yaml").read_bytes() == second_bytes
    assert access.schedule_record(root, "every-hour") == {  # who dropped the one in force
        "schedule": "every-hour",
        "submitted_by": {"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name},
        "source": "incoming/hourly-v2.yml",
        "file_id": identity,
        "accepted_at": NOW_TEXT,
    }
    assert names(root.incoming) == names(root.state / "intake") == names(root.queue) == []
    assert rundir.run_ids(root) == []


@pytest.mark.parametrize(
    "name",
    ["my job.yaml", "jöb 日本.yaml", "new\nline.yaml", "two__underscores.yml"],
    ids=["spaces", "unicode", "newline", "double-underscore"],
)
def test_names_with_spaces_unicode_and_newlines_are_taken(
    root: Spool, intake: Intake, drop: Callable[..., Path], name: str
) -> None:
    drop(name)
    [out] = rescan(intake)
    assert isinstance(out, Accepted)
    assert out.source == f"incoming/{name}"
    assert load_json(root.runs / out.run_id / "run.json")["trigger"]["source"] == f"incoming/{name}"
    assert names(root.incoming) == []


@pytest.mark.parametrize(
    "name",
    [".hidden.yaml", "x.yaml.tmp", "x.yaml.part", "x.yaml.swp", "X.YAML.TMP"],
    ids=["dotfile", "tmp", "part", "swp", "tmp-upper"],
)
def test_ignored_names_are_left_in_incoming(
    root: Spool, intake: Intake, drop: Callable[..., Path], name: str
) -> None:
    drop(name)
    assert not is_candidate(name)
    assert take(intake, name) == []
    assert rescan(intake) == []
    assert names(root.incoming) == [name]
    assert rundir.run_ids(root) == []


def test_a_file_that_vanished_is_ignored(intake: Intake) -> None:
    assert take(intake, "never-there.yaml") == []


# -- rejecting -----------------------------------------------------------------------------


def test_invalid_spec_is_rejected_with_every_error_and_its_line(
    root: Spool, intake: Intake, drop: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    drop("bad.yaml", BAD)
    with caplog.at_level(logging.WARNING, logger="chute.intake.rejections"):
        [out] = take(intake, "bad.yaml")

    assert out == Rejected("bad.yaml", "invalid", BAD_ERRORS)
    assert error_json(root, "bad.yaml") == {
        "file": "bad.yaml",
        "reason": "invalid",
        "errors": BAD_ERRORS,
        "rejected_at": NOW_TEXT,
    }
    assert (root.rejected / "bad.yaml").read_bytes() == BAD
    assert names(root.incoming) == names(root.state / "intake") == names(root.queue) == []
    assert rundir.run_ids(root) == []
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "incoming/bad.yaml rejected reason=invalid: incoming/bad.yaml:7: spec.cpus: 0 is out "
            "of range; expected an integer ≥ 1 (and 1 more in rejected/bad.yaml.error.json)",
        )
    ]


def test_too_large_file_is_rejected_without_reading_it(
    root: Spool, make_intake: Callable[..., Intake], drop: Callable[..., Path]
) -> None:
    intake = make_intake(max_file_size=64)
    drop("big.yaml", JOB + b"#" * (100 - len(JOB)))
    assert take(intake, "big.yaml") == [
        Rejected(
            "big.yaml",
            "too_large",
            [
                {
                    "path": "",
                    "line": 0,
                    "message": "is 100B (100 bytes), over the limit of 64B (64 bytes); a spec is "
                    "small — pass big data by reference, or raise max_file_size in the config",
                }
            ],
        )
    ]
    assert error_json(root, "big.yaml")["reason"] == "too_large"


def test_world_writable_file_is_rejected(
    root: Spool, intake: Intake, drop: Callable[..., Path]
) -> None:
    drop("open.yaml", JOB, mode=0o666)
    [out] = take(intake, "open.yaml")
    message = (
        "is world-writable (mode 0666); anyone could change it after it was checked — "
        "chmod o-w it, then drop it again"
    )
    assert out == refused("open.yaml", "world_writable", message)
    assert error_json(root, "open.yaml") == file_issue("open.yaml", "world_writable", message)


def test_hard_link_is_refused_and_the_other_name_is_left_alone(
    root: Spool, intake: Intake, tmp_path: Path
) -> None:
    original = tmp_path / "mine.yaml"
    original.write_bytes(JOB)
    os.link(original, root.incoming / "linked.yaml")

    [out] = take(intake, "linked.yaml")

    message = (
        "has 2 hard links; a dropped file must have only its own name — write a new file, "
        "then rename it into incoming/"
    )
    assert out == refused("linked.yaml", "not_regular", message)
    assert error_json(root, "linked.yaml") == file_issue("linked.yaml", "not_regular", message)
    assert original.read_bytes() == JOB
    assert rundir.run_ids(root) == []


def test_symlink_is_refused_without_following_it(
    root: Spool, intake: Intake, tmp_path: Path
) -> None:
    target = tmp_path / "secret.yaml"
    target.write_bytes(JOB)
    os.symlink(target, root.incoming / "link.yaml")

    [out] = take(intake, "link.yaml")

    message = "is a symbolic link; drop the file itself, not a link"
    assert out == refused("link.yaml", "symlink", message)
    assert error_json(root, "link.yaml") == file_issue("link.yaml", "symlink", message)
    assert os.path.islink(root.rejected / "link.yaml")
    assert target.read_bytes() == JOB
    assert rundir.run_ids(root) == []


def test_fifo_is_refused_without_blocking(root: Spool, intake: Intake) -> None:
    os.mkfifo(root.incoming / "pipe.yaml")
    started = time.monotonic()
    [out] = take(intake, "pipe.yaml")
    assert time.monotonic() - started < 1.0
    message = "is a FIFO, not a regular file; drop a YAML file"
    assert out == refused("pipe.yaml", "not_regular", message)
    assert error_json(root, "pipe.yaml") == file_issue("pipe.yaml", "not_regular", message)
    assert stat.S_ISFIFO(os.lstat(root.rejected / "pipe.yaml").st_mode)


def test_directory_and_socket_are_refused(
    root: Spool, intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root.incoming / "dir.yaml").mkdir()
    monkeypatch.chdir(root.incoming)  # a socket path must fit in 108 bytes
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("sock.yaml")
        out = rescan(intake)
    finally:
        sock.close()
    assert out == [
        refused("dir.yaml", "not_regular", "is a directory, not a regular file; drop a YAML file"),
        refused("sock.yaml", "not_regular", "is a socket, not a regular file; drop a YAML file"),
    ]
    assert names(root.incoming) == []


def test_rejected_name_collision_gets_a_numbered_name(
    root: Spool, intake: Intake, drop: Callable[..., Path]
) -> None:
    drop("bad.yaml", BAD)
    assert take(intake, "bad.yaml") == [Rejected("bad.yaml", "invalid", BAD_ERRORS)]
    drop("bad.yaml", BAD + b"# again\n")
    assert take(intake, "bad.yaml") == [Rejected("bad.yaml.1", "invalid", BAD_ERRORS)]
    assert names(root.rejected) == [
        "bad.yaml",
        "bad.yaml.1",
        "bad.yaml.1.error.json",
        "bad.yaml.error.json",
    ]
    assert error_json(root, "bad.yaml.1")["file"] == "bad.yaml"
    assert (root.rejected / "bad.yaml.1").read_bytes().endswith(b"# again\n")


def test_rejection_log_line_escapes_a_newline_in_the_name(
    intake: Intake, drop: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    drop("a\nb.yaml", JOB, mode=0o666)
    with caplog.at_level(logging.WARNING, logger="chute.intake.rejections"):
        [out] = take(intake, "a\nb.yaml")
    assert isinstance(out, Rejected)
    assert out.file == "a\nb.yaml"
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line
    assert line == (
        "incoming/a\\nb.yaml rejected reason=world_writable: incoming/a\\nb.yaml: is "
        "world-writable (mode 0666); anyone could change it after it was checked — chmod o-w "
        "it, then drop it again"
    )


# -- submitters ----------------------------------------------------------------------------


def test_file_of_a_user_outside_submitters_is_rejected_naming_the_owner(
    root: Spool,
    make_intake: Callable[..., Intake],
    drop: Callable[..., Path],
    alice: pwd.struct_passwd,
) -> None:
    intake = make_intake(submitters_users=("bob",), submitters_groups=("ops",))
    os.chown(drop("hers.yaml"), alice.pw_uid, alice.pw_gid)

    [out] = take(intake, "hers.yaml")

    message = (
        f"is owned by {ALICE} (uid {alice.pw_uid}), who is not among the submitters "
        "(users: bob; groups: ops); drop it as one of them, or ask an operator to add the "
        "user or a group to submitters in the config"
    )
    assert out == refused("hers.yaml", "not_submitter", message)
    assert error_json(root, "hers.yaml") == file_issue("hers.yaml", "not_submitter", message)


@pytest.mark.parametrize(
    "config",
    [{"submitters_users": (ALICE,)}, {"submitters_groups": (ALICE,)}],
    ids=["listed-user", "member-of-listed-group"],
)
def test_file_of_a_listed_submitter_is_accepted(
    root: Spool,
    make_intake: Callable[..., Intake],
    drop: Callable[..., Path],
    alice: pwd.struct_passwd,
    config: dict[str, Any],
) -> None:
    intake = make_intake(**config)
    os.chown(drop("hers.yaml"), alice.pw_uid, alice.pw_gid)
    [out] = take(intake, "hers.yaml")
    assert isinstance(out, Accepted)
    assert out.submitted_by == {"uid": alice.pw_uid, "user": ALICE}
    assert load_json(root.runs / out.run_id / "run.json")["submitted_by"]["user"] == ALICE


def test_daemon_user_that_cannot_read_or_lease_a_file_rejects_or_takes_it(
    alice: pwd.struct_passwd,
) -> None:
    """The daemon as an unprivileged user: a 0600 file of root's is unreadable; a 0644 one
    cannot be leased (not the owner, no CAP_LEASE) and is judged by size and mtime."""
    base = Path(tempfile.mkdtemp(prefix="chute-test-"))  # pytest's tmp folders are root-only
    try:
        root = Spool(root=base / "spool", runs=base / "spool" / "runs")
        root.ensure()
        new_intake(root)
        for path in [base, *base.rglob("*")]:
            os.chown(path, alice.pw_uid, alice.pw_gid)
        (root.incoming / "secret.yaml").write_bytes(JOB)
        os.chmod(root.incoming / "secret.yaml", 0o600)
        (root.incoming / "public.yaml").write_bytes(JOB)
        os.chmod(root.incoming / "public.yaml", 0o644)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                os.close(read_end)
                os.setgroups([])
                os.setresgid(alice.pw_gid, alice.pw_gid, alice.pw_gid)
                os.setresuid(alice.pw_uid, alice.pw_uid, alice.pw_uid)
                intake = Intake(
                    root, Config(), node_cpus=2, node_memory=1 << 30, clock=FixedClock()
                )
                report = [
                    (type(o).__name__, getattr(o, "reason", None), getattr(o, "errors", None))
                    for o in rescan(intake)
                ]
                os.write(write_end, orjson.dumps(report))
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            report = f.read()
        assert os.waitpid(pid, 0)[1] == 0
        assert orjson.loads(report) == [
            ["Accepted", None, None],
            [
                "Rejected",
                "unreadable",
                [
                    {
                        "path": "",
                        "line": 0,
                        "message": "cannot open: Permission denied; make it readable by the "
                        f"daemon's user ({ALICE})",
                    }
                ],
            ],
        ]
        assert names(root.incoming) == []
        assert names(root.rejected) == ["secret.yaml", "secret.yaml.error.json"]
    finally:
        shutil.rmtree(base)


# -- files still being written -------------------------------------------------------------


def test_file_held_open_for_writing_is_not_taken_until_closed(
    root: Spool, intake: Intake, watcher: Watcher
) -> None:
    path = root.incoming / "slow.yaml"
    with path.open("wb") as f:
        f.write(JOB)
        f.flush()
        assert take(intake, "slow.yaml") == []
        assert rescan(intake) == []
        assert names(root.incoming) == ["slow.yaml"]
        assert names(root.state / "intake") == []
    ready, _, _ = read_events(watcher, "slow.yaml closed", lambda r, d, o: "slow.yaml" in r)
    assert ready == ["slow.yaml"]
    [out] = take(intake, "slow.yaml")
    assert isinstance(out, Accepted)
    assert out.spec_bytes == JOB


# -- failures and crashes ------------------------------------------------------------------


def test_a_failed_handover_keeps_the_claim_and_the_next_scan_finishes_it(
    root: Spool, intake: Intake, drop: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    root.queue.rmdir()
    root.queue.write_bytes(b"")  # writing queue/<id>.yaml now fails with ENOTDIR
    drop("job.yaml")
    with caplog.at_level(logging.ERROR, logger="chute.intake.drops"):
        assert take(intake, "job.yaml") == []
    [claim] = names(root.state / "intake")
    run_id = claim.split("__")[0]
    assert claim == f"{run_id}__job.yaml"
    assert rundir.run_ids(root) == [run_id]
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"incoming/job.yaml: intake stopped at {root.queue}/{run_id}.yaml:")
    assert line.endswith(
        ": Not a directory (errno 20); the file stays where it is and is retried at the next "
        "rescan — free space or fix permissions on the spool"
    )

    root.queue.unlink()
    root.queue.mkdir()
    [out] = rescan(intake)

    assert isinstance(out, Accepted)
    assert (out.run_id, out.source, out.spec_bytes, out.dropped_at) == (
        run_id,
        "incoming/job.yaml",
        JOB,
        None,
    )
    assert names(root.queue) == [f"{run_id}.yaml"]
    assert names(root.state / "intake") == []
    assert rundir.run_ids(root) == [run_id]


def make_run(root: Spool, run_id: str, data: bytes = JOB, state: str = "queued") -> None:
    record = rundir.new_record(
        run_id=run_id,
        pipeline="hello",
        kind="Job",
        trigger={"type": "drop", "source": "incoming/job.yaml"},
        submitted_by={"uid": 0, "user": "root"},
        spec_sha256=hashlib.sha256(data).hexdigest(),
        created_at=NOW,
        run_date="2026-11-22",
    )
    rundir.make_folders(root, [(record, data)])
    if state != "queued":
        atomic.write_json(root.runs / run_id / "run.json", {**record, "state": state})


def claim(root: Spool, name: str = "job.yaml", data: bytes = JOB, run_id: str = RUN_ID) -> Path:
    path = root.state / "intake" / f"{run_id}__{name}"
    path.write_bytes(data)
    return path


def test_crash_after_claim_before_run_folder_redoes_it_with_the_same_run_id(
    root: Spool, intake: Intake
) -> None:
    claim(root)
    assert intake.recover() == []  # the daemon starts it from queue/, like any queued run
    assert rundir.run_ids(root) == [RUN_ID]
    run = load_json(root.runs / RUN_ID / "run.json")
    assert (run["state"], run["trigger"]["source"]) == ("queued", "incoming/job.yaml")
    assert names(root.queue) == [f"{RUN_ID}.yaml"]
    assert (root.queue / f"{RUN_ID}.yaml").read_bytes() == JOB
    assert names(root.state / "intake") == []
    assert rescan(intake) == []


def test_crash_inside_run_folder_creation_removes_the_half_made_folder_and_redoes_it(
    root: Spool, intake: Intake
) -> None:
    claim(root)
    (root.runs / RUN_ID / "stages").mkdir(parents=True)
    assert intake.recover() == []
    assert rundir.run_ids(root) == [RUN_ID]
    assert load_json(root.runs / RUN_ID / "run.json")["state"] == "queued"
    assert names(root.queue) == [f"{RUN_ID}.yaml"]


def test_crash_after_run_folder_before_queue_file_writes_the_queue_file_once(
    root: Spool, intake: Intake
) -> None:
    make_run(root, RUN_ID)
    claim(root, data=JOB + b"# changed by a writer that kept its fd\n")
    assert intake.recover() == []
    assert (root.queue / f"{RUN_ID}.yaml").read_bytes() == JOB  # the bytes accepted
    assert names(root.state / "intake") == []
    assert rundir.run_ids(root) == [RUN_ID]
    assert rescan(intake) == []


@pytest.mark.parametrize(
    "damaged", [b"", b'{"run_id": "2026', b"[]"], ids=["empty", "torn", "array"]
)
def test_power_loss_before_the_handover_synced_remakes_a_damaged_run_json(
    root: Spool, intake: Intake, damaged: bytes
) -> None:
    """decide_many puts run.json in place unsynced; a power loss can leave it empty, torn
    or (a disk's fault, a human) not a run record at all."""
    make_run(root, RUN_ID)
    (root.runs / RUN_ID / "run.json").write_bytes(damaged)
    claim(root)
    assert intake.recover() == []
    run = load_json(root.runs / RUN_ID / "run.json")
    assert (run["run_id"], run["state"]) == (RUN_ID, "queued")
    assert (root.queue / f"{RUN_ID}.yaml").read_bytes() == JOB
    assert names(root.state / "intake") == []


def test_power_loss_before_the_handover_synced_rewrites_a_damaged_spec_from_the_claim(
    root: Spool, intake: Intake
) -> None:
    make_run(root, RUN_ID)
    spec = root.runs / RUN_ID / "spec.yaml"
    spec.write_bytes(b"\0" * len(JOB))  # the queue link, made of the same inode, too
    claim(root)
    assert intake.recover() == []
    assert spec.read_bytes() == JOB
    assert (root.queue / f"{RUN_ID}.yaml").read_bytes() == JOB
    assert names(root.state / "intake") == []


def test_crash_after_queue_file_before_unlinking_the_claim_only_unlinks_it(
    root: Spool, intake: Intake
) -> None:
    make_run(root, RUN_ID)
    atomic.write_bytes(root.queue / f"{RUN_ID}.yaml", JOB)
    claim(root)
    assert intake.recover() == []
    assert names(root.queue) == [f"{RUN_ID}.yaml"]
    assert names(root.state / "intake") == []
    assert rundir.run_ids(root) == [RUN_ID]


def test_claim_of_a_run_that_moved_on_does_not_queue_it_again(root: Spool, intake: Intake) -> None:
    make_run(root, RUN_ID, state="succeeded")
    claim(root)
    assert intake.recover() == []
    assert names(root.queue) == []
    assert names(root.state / "intake") == []


def test_crash_after_schedule_write_before_unlinking_the_claim_writes_it_again(
    root: Spool, intake: Intake
) -> None:
    atomic.write_bytes(root.schedules / "every-hour.yaml", EVERY_HOUR)
    claim(root, "hourly.yaml", EVERY_HOUR)
    [out] = intake.recover()
    assert isinstance(out, Scheduled)
    assert (out.name, out.replaced) == ("every-hour", True)
    assert names(root.schedules) == ["every-hour.yaml"]
    assert names(root.state / "intake") == []
    assert rundir.run_ids(root) == []


def test_crash_before_rejecting_a_claim_rejects_it_once(root: Spool, intake: Intake) -> None:
    claim(root, "bad.yaml", BAD)
    assert intake.recover() == [Rejected("bad.yaml", "invalid", BAD_ERRORS)]
    assert names(root.rejected) == ["bad.yaml", "bad.yaml.error.json"]
    assert names(root.state / "intake") == []


def test_crash_between_rejection_rename_and_error_json_writes_the_error_json(
    root: Spool, intake: Intake
) -> None:
    (root.rejected / "bad.yaml.1").write_bytes(BAD)
    (root.rejected / "open.yaml").write_bytes(JOB)
    os.chmod(root.rejected / "open.yaml", 0o666)
    (root.rejected / "done.yaml").write_bytes(BAD)
    atomic.write_json(root.rejected / "done.yaml.error.json", {"kept": True})

    out = intake.recover()

    message = (
        "is world-writable (mode 0666); anyone could change it after it was checked — "
        "chmod o-w it, then drop it again"
    )
    assert out == [
        Rejected("bad.yaml.1", "invalid", BAD_ERRORS),
        refused("open.yaml", "world_writable", message),
    ]
    assert error_json(root, "bad.yaml.1") == {
        "file": "bad.yaml",
        "reason": "invalid",
        "errors": BAD_ERRORS,
        "rejected_at": NOW_TEXT,
    }
    assert error_json(root, "open.yaml") == file_issue("open.yaml", "world_writable", message)
    assert error_json(root, "done.yaml") == {"kept": True}
    assert intake.recover() == []


def test_recover_removes_temp_leftovers(root: Spool, intake: Intake) -> None:
    leftovers = [
        root.queue / f".tmp-{RUN_ID}.yaml.123",
        root.schedules / ".tmp-every-hour.yaml.123",
        root.rejected / ".tmp-bad.yaml.error.json.123",
        root.state / "intake" / ".tmp-x.123",
    ]
    for path in leftovers:
        path.write_bytes(b"half")
    (root.schedules / "keep.yaml").write_bytes(EVERY_HOUR)
    assert intake.recover() == []
    assert [p for p in leftovers if p.exists()] == []
    assert names(root.schedules) == ["keep.yaml"]


def test_files_dropped_while_down_are_taken_by_the_start_up_scan_in_name_order(
    root: Spool, intake: Intake, drop: Callable[..., Path]
) -> None:
    drop("b.yaml", BAD)
    drop("a.yaml")
    drop("c.yml", EVERY_HOUR)
    claim(root, "z.yaml")
    assert intake.recover() == []
    out = rescan(intake)
    assert [type(o).__name__ for o in out] == ["Accepted", "Rejected", "Scheduled"]
    assert isinstance(out[0], Accepted)
    assert out[0].source == "incoming/a.yaml"
    assert names(root.incoming) == names(root.state / "intake") == []
    assert len(rundir.run_ids(root)) == 2


# -- watching ------------------------------------------------------------------------------


def test_watcher_reports_a_rename_into_incoming_as_ready(
    watcher: Watcher, drop: Callable[..., Path]
) -> None:
    drop("job.yaml")
    drop(".hidden.yaml")
    ready, deleted, overflowed = read_events(watcher, "job.yaml", lambda r, d, o: bool(r))
    assert (ready, deleted, overflowed) == (["job.yaml"], [], False)


def test_watcher_reports_a_file_written_in_place_when_it_is_closed(
    root: Spool, watcher: Watcher
) -> None:
    (root.incoming / "x.yaml.part").write_bytes(JOB)
    (root.incoming / "in place.yaml").write_bytes(JOB)
    ready, _, _ = read_events(watcher, "in place.yaml", lambda r, d, o: bool(r))
    assert ready == ["in place.yaml"]


def test_watcher_reports_a_deleted_or_moved_away_schedule(
    root: Spool, watcher: Watcher, tmp_path: Path
) -> None:
    for name in ("a.yaml", "b.yaml"):
        (root.schedules / name).write_bytes(EVERY_HOUR)
    watcher.read()
    atomic.write_bytes(root.schedules / "a.yaml", EVERY_HOUR)  # a replacement is no deletion
    os.unlink(root.schedules / "a.yaml")
    os.rename(root.schedules / "b.yaml", tmp_path / "b.yaml")
    _, deleted, _ = read_events(watcher, "two deletions", lambda r, d, o: len(d) == 2)
    assert deleted == ["a.yaml", "b.yaml"]


def test_watcher_reports_an_overflowed_queue(root: Spool, drop: Callable[..., Path]) -> None:
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    if os.geteuid() != 0 or not os.access(knob, os.W_OK):
        pytest.skip("shrinking the inotify queue needs root and a writable /proc/sys")
    saved = knob.read_text()
    try:
        knob.write_text("4\n")
        w = Watcher(root)  # the limit is read when the instance is made
    finally:
        knob.write_text(saved)
    try:
        for i in range(20):
            drop(f"f{i:02}.yaml")
        _, _, overflowed = read_events(w, "an overflow", lambda r, d, o: o)
        assert overflowed
    finally:
        w.close()


def test_watcher_that_cannot_start_names_the_limit_to_raise(root: Spool) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(OSError, match="max_user_instances") as caught:
            Watcher(root)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert str(caught.value) == (
        "[Errno 24] inotify_init: Too many open files (errno 24); the inotify instance limit "
        "(or the open-file limit) is reached: raise fs.inotify.max_user_instances "
        "(sysctl -w fs.inotify.max_user_instances=1024) or LimitNOFILE=; until then intake "
        "polls incoming/"
    )


def test_watcher_sees_each_of_200_drops_within_50ms(
    root: Spool, watcher: Watcher, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(200):
        (outside / f"j{i:03}.yaml").write_bytes(JOB)
    latencies: list[float] = []
    for i in range(200):
        name = f"j{i:03}.yaml"
        started = time.perf_counter()
        os.rename(outside / name, root.incoming / name)
        read_events(watcher, name, lambda r, d, o, name=name: name in r)
        latencies.append(time.perf_counter() - started)
        os.unlink(root.incoming / name)
    latencies.sort()
    p50, p99 = latencies[99] * 1000, latencies[197] * 1000
    print(f"\ndrop -> Watcher.read latency over 200 renames: p50 {p50:.2f} ms, p99 {p99:.2f} ms")  # noqa: T201
    assert p99 < 50, f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"


def test_watcher_and_take_together_claim_a_drop_once(
    root: Spool, intake: Intake, watcher: Watcher, drop: Callable[..., Path]
) -> None:
    drop("job.yaml")
    ready, _, _ = read_events(watcher, "job.yaml", lambda r, d, o: bool(r))
    outcomes = take(intake, *ready) + rescan(intake) + take(intake, "job.yaml")
    assert len(outcomes) == 1
    wait_for("incoming/ to be empty", lambda: names(root.incoming) == [])
    assert len(rundir.run_ids(root)) == 1
