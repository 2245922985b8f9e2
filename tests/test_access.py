"""Who may act on what: real users (useradd) drive the real CLI (setpriv) against the real
daemon on a spool laid out as systemd/chute.tmpfiles.conf lays it out. A run is cancelled or
retried, and a schedule unscheduled or replaced, only by its submitter, root, the daemon's
user or an admin; anyone else is refused with the reason."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Done, chute_env, load_json, wait_for
from daemon_proc import Daemon, job, runs_of

TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "setpriv")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
    reason="needs root, useradd/groupadd and setpriv (util-linux) to act as other users",
)


def _as_root(*command: str) -> None:
    """useradd and friends, retried while another process holds the user database's lock."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{' '.join(command)}: exit {done.returncode}: {done.stderr}")
        time.sleep(0.2)


@dataclass(frozen=True)
class People:
    submit_gid: int  # stands in for chute-submit
    admins: str  # the admin group's name
    alice: pwd.struct_passwd
    bob: pwd.struct_passwd
    ada: pwd.struct_passwd  # a member of the admin group


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    tag = f"ch{os.getpid()}"
    submit, admins = f"{tag}sub", f"{tag}adm"
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for group in (submit, admins):
            _as_root("groupadd", group)
            made_groups.append(group)
        for name, extra in (("alice", submit), ("bob", submit), ("ada", f"{submit},{admins}")):
            user = f"{tag}{name}"
            _as_root(
                "useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                "--groups", extra, user,
            )  # fmt: skip
            made_users.append(user)
        yield People(
            submit_gid=int(subprocess.check_output(["getent", "group", submit]).split(b":")[2]),
            admins=admins,
            alice=pwd.getpwnam(f"{tag}alice"),
            bob=pwd.getpwnam(f"{tag}bob"),
            ada=pwd.getpwnam(f"{tag}ada"),
        )
    finally:
        for user in made_users:
            _as_root("userdel", user)
        for group in reversed(made_groups):
            _as_root("groupdel", group)


@dataclass
class Site:
    spool: Path
    files: Path  # job files any user may read
    daemon: Daemon

    def chute(self, user: pwd.struct_passwd, *args: str) -> Done:
        """`chute ARGS` as `user`: their uid, primary group and supplementary groups."""
        command = [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            sys.executable, "-m", "chute", *args, "--spool", str(self.spool),
        ]  # fmt: skip
        p = subprocess.run(command, capture_output=True, text=True, timeout=120, env=chute_env())
        return Done(p.returncode, p.stdout, p.stderr)

    def write(self, name: str, text: str) -> str:
        path = self.files / name
        path.write_text(text)
        path.chmod(0o644)
        return str(path)


@pytest.fixture
def site(people: People, tmp_path: Path) -> Iterator[Site]:
    """A spool the users can reach (pytest's own temp folders are root's alone), its folders
    with chute.tmpfiles.conf's modes, the submit group in place of chute-submit, and a daemon
    (root: the daemon's user) whose config names the admin group."""
    root = Path(tempfile.mkdtemp(prefix="chute-owners-"))
    root.chmod(0o755)
    spool = root / "spool"
    modes = {"incoming": 0o3730, "control": 0o3730, "cache": 0o750}
    try:
        spool.mkdir()
        for folder in (spool, *(spool / n for n in ("incoming", "control", "queue", "schedules",
                       "rejected", "runs", "pipelines", "cache", "state"))):  # fmt: skip
            folder.mkdir(exist_ok=True)
            os.chown(folder, 0, 0 if folder.name == "cache" else people.submit_gid)
            folder.chmod(modes.get(folder.name, 0o750))
        files = root / "files"
        files.mkdir(mode=0o755)
        daemon = Daemon(spool, tmp_path, f"admins: {{groups: [{people.admins}]}}\n")
        try:
            yield Site(spool, files, daemon.start())
        finally:
            daemon.close()
    finally:
        shutil.rmtree(root)


ACCEPTED = re.compile(r"accepted as run (\S+)$", re.MULTILINE)


def _run_id(done: Done) -> str:
    found = ACCEPTED.search(done.out)
    assert found is not None, done.out + done.err
    return found.group(1)


def _state(site: Site, run_id: str) -> str:
    return str(load_json(site.spool / "runs" / run_id / "run.json")["state"])


def _refusal(site: Site, done: Done) -> dict[str, object]:
    """The error.json of the request the daemon refused, which the CLI's message names."""
    assert done.code == 2, done.out + done.err
    assert done.err.startswith("the daemon refused the request: "), done.err
    report = re.search(r"\((\S+\.error\.json)\)$", done.err.strip())
    assert report is not None, done.err
    doc: dict[str, object] = load_json(Path(report.group(1)))
    assert Path(report.group(1)).parent == site.spool / "rejected"
    return doc


@pytest.mark.slow
def test_a_run_is_cancelled_or_retried_only_by_its_submitter_root_or_an_admin(
    people: People, site: Site
) -> None:
    alice, bob, ada = people.alice, people.bob, people.ada
    slow = site.write("slow.yaml", job("slow", "sleep 60"))
    long_run = _run_id(site.chute(alice, "submit", slow))
    assert load_json(site.spool / "runs" / long_run / "run.json")["submitted_by"] == {
        "uid": alice.pw_uid,
        "user": alice.pw_name,
    }
    refused = site.chute(bob, "cancel", long_run)
    doc = _refusal(site, refused)
    message = (
        f"{bob.pw_name} (uid {bob.pw_uid}) may not cancel run {long_run}: it was submitted by "
        f"{alice.pw_name} (uid {alice.pw_uid}); only its submitter, root, the daemon's user "
        f"(root (uid 0)) and the admins (groups: {people.admins}) may — ask one of them, or an "
        "operator to add you to admins in the config"
    )
    assert message in refused.err
    assert (doc["reason"], doc["errors"]) == (
        "not_owner",
        [{"path": "run", "line": 0, "message": message}],
    )
    assert _state(site, long_run) in ("queued", "running")
    by_admin = site.chute(ada, "cancel", long_run)
    assert (by_admin.code, by_admin.out) == (0, f"{long_run} cancelled\n"), by_admin.err

    fails = site.write("fails.yaml", job("fails", "exit 3"))
    failed = site.chute(alice, "submit", fails, "--wait")
    assert failed.code == 1, failed.out + failed.err
    failed_run = _run_id(failed)
    doc = _refusal(site, site.chute(bob, "retry", failed_run))
    assert doc["reason"] == "not_owner"
    assert not [r for r in os.listdir(site.spool / "runs") if r > failed_run and r[0] != "l"]
    retried = site.chute(alice, "retry", failed_run)
    assert retried.code == 0, retried.err
    retry_run = retried.out.split()[-1]
    assert load_json(site.spool / "runs" / retry_run / "run.json")["submitted_by"] == {
        "uid": alice.pw_uid,
        "user": alice.pw_name,
    }  # hers, so she may cancel it in turn

    own = _run_id(site.chute(alice, "submit", slow))
    mine = site.chute(alice, "cancel", own)
    assert (mine.code, mine.out) == (0, f"{own} cancelled\n"), mine.err
    assert "Traceback" not in site.daemon.log.read_text()


@pytest.mark.slow
def test_a_schedule_is_unscheduled_or_replaced_only_by_its_submitter(
    people: People, site: Site
) -> None:
    alice, bob = people.alice, people.bob
    hers = site.write("tick.yaml", job("tick", "true", "  schedule: {every: 1h}\n"))
    placed = site.chute(alice, "submit", hers)
    assert placed.out.endswith("incoming/tick.yaml scheduled as tick\n"), placed.err
    schedule = site.spool / "schedules" / "tick.yaml"
    kept = schedule.read_bytes()

    doc = _refusal(site, site.chute(bob, "unschedule", "tick"))
    assert doc["reason"] == "not_owner"
    assert f"may not unschedule tick: it was submitted by {alice.pw_name}" in str(doc["errors"])
    assert schedule.read_bytes() == kept

    his = site.write("mine.yaml", job("tick", "echo mine", "  schedule: {every: 1m}\n"))
    replaced = site.chute(bob, "submit", his)
    assert replaced.code == 1, replaced.out + replaced.err
    assert replaced.err.startswith(
        f"incoming/mine.yaml rejected: not_owner: {bob.pw_name} (uid {bob.pw_uid}) may not "
        f"replace schedule tick: it was submitted by {alice.pw_name}"
    ), replaced.err
    assert "(or give this file another metadata.name)" in replaced.err
    assert schedule.read_bytes() == kept

    done = site.chute(alice, "unschedule", "tick")
    assert (done.code, done.out) == (0, "unscheduled tick\n"), done.err
    wait_for("the owner record to go", lambda: not (site.spool / "state/owners/tick.json").exists())
    taken = site.chute(bob, "submit", his)  # the name is free again: now his
    assert taken.out.endswith("incoming/mine.yaml scheduled as tick\n"), taken.err


@pytest.mark.slow
def test_the_runs_a_schedule_fires_are_its_submitters_to_cancel(people: People, site: Site) -> None:
    alice, bob = people.alice, people.bob
    spec = site.write("often.yaml", job("often", "sleep 60", "  schedule: {every: 1s}\n"))
    assert site.chute(alice, "submit", spec).code == 0
    fired = wait_for(
        "a fire to run",
        lambda: [r for r in runs_of(site.spool) if r["state"] == "running"],
        30,
    )[0]
    assert fired["submitted_by"] == {"uid": alice.pw_uid, "user": alice.pw_name}
    assert _refusal(site, site.chute(bob, "cancel", fired["run_id"]))["reason"] == "not_owner"
    done = site.chute(alice, "cancel", fired["run_id"])
    assert (done.code, done.out) == (0, f"{fired['run_id']} cancelled\n"), done.err
    assert site.chute(alice, "unschedule", "often").code == 0
    # A fire may have started another run between the cancel and the unschedule: end it too,
    # or its `sleep 60` outlives the test's daemon.
    for run in runs_of(site.spool):
        if run["state"] in ("queued", "running"):
            assert site.chute(alice, "cancel", run["run_id"]).code == 0
