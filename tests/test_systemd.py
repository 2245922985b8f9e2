"""The files of systemd/: the unit passes systemd's own checks, the example config and the
tmpfiles snippet cover every config key and spool folder, sysusers + tmpfiles build the
spool with the owners and modes we document, and the documented server install
(systemd/install.sh, which docs/operations.md tells operators to run) makes a working
virtualenv, the users, the spool and the unit, as written.

`systemd-analyze`, `systemd-sysusers` and `systemd-tmpfiles` work without systemd as PID 1;
CI installs them (.ci/run). Running the service itself is not possible on these machines.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from chute.config import Config, load_config
from chute.store.spool import FOLDERS
from chute.units import parse_duration
from conftest import Chute, wait_for
from daemon_proc import Daemon, daemon_factory, final_run, job, runs_of

__all__ = ["daemon_factory"]  # a fixture, used by name
REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "chute.service"
INSTALL = SYSTEMD / "install.sh"
VENV_CHUTE = "/opt/chute/bin/chute"  # where install.sh puts the script the unit runs

# Measured with systemd 252 (Debian 12): 2.8 "OK". Raise it only with a reason in the unit.
MAX_EXPOSURE = 3.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (.ci/run installs the systemd package)",
)


def _unit_settings() -> dict[str, list[str]]:
    """Key -> values of the unit, every section together (our keys are not repeated)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with an ExecStart that exists here.

    `systemd-analyze verify` fails when the ExecStart binary is missing, and
    /opt/chute/bin/chute exists only on an installed server: point it at the `chute` script
    of this environment, else at `python -m chute`. Nothing else changes.
    """
    script = shutil.which("chute")
    command = script if script else f"{sys.executable} -m chute"
    text = UNIT.read_text()
    assert f"ExecStart={VENV_CHUTE} daemon " in text
    copy = tmp_path / "chute.service"
    copy.write_text(text.replace(f"ExecStart={VENV_CHUTE} ", f"ExecStart={command} "))
    return copy


@needs_analyze
def test_unit_passes_systemd_analyze_verify_silently(unit_copy: Path) -> None:
    # verify exits 0 on unknown keys and bad values and only prints them: any output fails.
    p = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit_copy.parent,
    )
    assert (p.returncode, p.stdout + p.stderr) == (0, "")


@needs_analyze
def test_unit_exposure_score_stays_low(unit_copy: Path) -> None:
    p = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit_copy.parent,
    )
    assert p.returncode == 0, p.stderr
    found = re.search(r"Overall exposure level for chute\.service: (\d+\.\d+)", p.stdout)
    assert found, p.stdout + p.stderr
    score = float(found.group(1))
    # Shown with `pytest -s`: the number to compare when a systemd upgrade moves it.
    print(f"systemd-analyze security: exposure {score} (limit {MAX_EXPOSURE})")  # noqa: T201
    assert score <= MAX_EXPOSURE, p.stdout


def test_unit_runs_as_chute_stops_gracefully_and_survives_a_task_oom() -> None:
    unit = _unit_settings()
    assert (unit["User"], unit["Group"]) == (["chute"], ["chute-submit"])
    assert unit["Type"] == ["notify"]
    assert unit["KillMode"] == ["mixed"], "control-group would SIGTERM every task at once"
    assert unit["OOMPolicy"] == ["continue"], "stop would end every run for one OOM kill"
    assert unit["Delegate"] == ["yes"], "a cgroup per task needs the service's subtree"
    assert "ProtectControlGroups" not in unit, "it would make the delegated subtree read-only"
    assert unit["ReadWritePaths"] == ["/var/spool/chute"]
    assert unit["ExecStart"] == [f"{VENV_CHUTE} daemon --config /etc/chute/chute.yaml"]


def test_unit_stop_timeout_exceeds_the_configs_stop_timeout_and_kill_grace() -> None:
    config = load_config(SYSTEMD / "chute.yaml")
    (stop,) = _unit_settings()["TimeoutStopSec"]
    margin = 10.0  # to write run.json and manifest.json of the interrupted runs
    assert parse_duration(stop) >= config.stop_timeout + config.kill_grace + margin


def _flattened_keys(data: dict[str, Any]) -> set[str]:
    """Config field names of a config file: submitters.users -> submitters_users.

    A section's key maps to `<section>_<key>` when Config has such a field, else to
    `<key>` (retention.keep_runs -> keep_runs).
    """
    fields = {f.name for f in dataclasses.fields(Config)}
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            for sub in value:
                keys.add(f"{key}_{sub}" if f"{key}_{sub}" in fields else sub)
        else:
            keys.add(key)
    return keys


def test_example_config_sets_every_key_to_its_default() -> None:
    path = SYSTEMD / "chute.yaml"
    config = load_config(path)
    # where the config and its HTTP address came from: not keys of the file
    fields = {f.name for f in dataclasses.fields(Config)} - {"source", "http_listen_from"}
    assert _flattened_keys(yaml.safe_load(path.read_text())) == fields
    systemd_layout = Config(spool=Path("/var/spool/chute"), runs_dir=Path("/var/spool/chute/runs"))
    assert config == systemd_layout


def test_example_config_comments_every_key() -> None:
    keys = [
        line
        for line in (SYSTEMD / "chute.yaml").read_text().splitlines()
        if re.match(r"\s*[a-z_]+:", line)
    ]
    sections = ("submitters:", "admins:", "http:", "retention:", "executor:")
    uncommented = [line for line in keys if "#" not in line and line not in sections]
    assert uncommented == []


def _tmpfiles_paths() -> dict[str, tuple[str, str, str]]:
    """Path -> (mode, user, group) of the `d` lines of chute.tmpfiles.conf."""
    paths = {}
    for line in (SYSTEMD / "chute.tmpfiles.conf").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "d":
            _, path, mode, user, group, age = parts
            assert age == "-", f"{path}: tmpfiles --clean must never age out the spool"
            paths[path] = (mode, user, group)
    return paths


def test_tmpfiles_creates_every_spool_folder() -> None:
    paths = _tmpfiles_paths()
    for name in (*FOLDERS, "runs"):
        assert f"/var/spool/chute/{name}" in paths, name


def test_tmpfiles_drop_boxes_let_submitters_write_but_not_list() -> None:
    paths = _tmpfiles_paths()
    assert paths["/var/spool/chute"] == ("0750", "chute", "chute-submit")
    assert paths["/var/spool/chute/runs"] == ("0750", "chute", "chute-submit")
    assert paths["/var/spool/chute/incoming"] == ("3730", "chute", "chute-submit")
    assert paths["/var/spool/chute/control"] == ("3730", "chute", "chute-submit")
    assert paths["/var/spool/chute/state"] == ("0750", "chute", "chute-submit")
    assert paths["/etc/chute"] == ("0755", "root", "root")


def _why_no_sysusers_tmpfiles() -> str | None:
    if os.geteuid() != 0:
        return "systemd-tmpfiles needs root to chown"
    if shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None:
        return "systemd-sysusers/systemd-tmpfiles are not installed (.ci/run installs systemd)"
    return None


_NO_SYSUSERS_TMPFILES = _why_no_sysusers_tmpfiles()
needs_sysusers_tmpfiles = pytest.mark.skipif(
    _NO_SYSUSERS_TMPFILES is not None, reason=_NO_SYSUSERS_TMPFILES or ""
)


def _check_users_and_spool(root: Path) -> None:
    """The users sysusers made in `root`, and the folders tmpfiles made there with the
    owners and modes of chute.tmpfiles.conf."""
    users = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    assert users["chute"][5:] == ["/var/spool/chute", "/usr/sbin/nologin"]
    assert groups["chute-submit"][3] == "chute"
    ids = {"root": 0, "chute": int(users["chute"][2])}
    gids = {
        "root": 0,
        "chute": int(groups["chute"][2]),
        "chute-submit": int(groups["chute-submit"][2]),
    }
    for path, (mode, user, group) in _tmpfiles_paths().items():
        st = (root / path.lstrip("/")).stat()
        assert stat.S_ISDIR(st.st_mode), path
        assert (oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid) == (
            oct(int(mode, 8)),
            ids[user],
            gids[group],
        ), path


@needs_sysusers_tmpfiles
def test_sysusers_and_tmpfiles_build_the_spool_in_a_root(tmp_path: Path) -> None:
    # Both tools work offline on --root: users go into <root>/etc/passwd, and tmpfiles
    # resolves names from there, so the host's user database is never touched.
    (tmp_path / "etc").mkdir()
    for tool, conf in (
        (["systemd-sysusers"], "chute.sysusers.conf"),
        (["systemd-tmpfiles", "--create"], "chute.tmpfiles.conf"),
    ):
        p = subprocess.run(
            [*tool, f"--root={tmp_path}", str(SYSTEMD / conf)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
    _check_users_and_spool(tmp_path)


def test_the_documented_server_install_is_the_script_and_the_unit_runs_its_virtualenv() -> None:
    ops = (REPO / "docs" / "operations.md").read_text()
    install = ops.split("## Install on a server", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", install, re.S)
    assert "sh systemd/install.sh\n" in commands, "the doc must run the script the tests run"
    assert not any("pip" in c for c in commands), "pip into the system's Python fails (PEP 668)"
    script = INSTALL.read_text()
    assert 'python3 -m venv "$root/opt/chute"' in script
    assert _unit_settings()["ExecStart"][0].split()[0] == VENV_CHUTE  # /opt/chute/bin/chute


def _python_for_install(tmp_path: Path) -> dict[str, str]:
    """PATH for install.sh: Debian's own python3 when this machine has one that refuses
    `pip install` (PEP 668), the case the script is for; else whatever python3 is here."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    system = Path("/usr/bin/python3")
    managed = list(Path("/usr/lib").glob("python3*/EXTERNALLY-MANAGED"))
    usable = (
        system.exists()
        and managed
        and subprocess.run(
            [str(system), "-c", "import sys, ensurepip, venv; assert sys.version_info >= (3, 11)"],
            capture_output=True,
        ).returncode
        == 0
    )
    if usable:
        bin_dir = tmp_path / "python-bin"
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(system)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.slow
@needs_analyze
@needs_sysusers_tmpfiles
def test_install_script_makes_a_venv_the_users_the_spool_and_a_unit_that_verifies(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    env = {**_python_for_install(tmp_path), "ROOT": str(root)}

    def install() -> None:
        p = subprocess.run(
            ["sh", str(INSTALL)], env=env, capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, p.stdout + p.stderr

    install()
    chute = root / VENV_CHUTE.lstrip("/")
    done = subprocess.run(
        [str(chute), "validate", str(REPO / "spool/examples/hello.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != "ROOT"},
    )
    assert done.returncode == 0, done.stderr
    assert "ok: Job hello" in done.stdout
    where = subprocess.run(
        [str(root / "opt/chute/bin/python"), "-c", "import chute; print(chute.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert where.startswith(str(root / "opt/chute/lib")), "chute must be the venv's own copy"
    assert os.readlink(root / "usr/local/bin/chute") == VENV_CHUTE  # `chute` on PATH
    _check_users_and_spool(root)
    assert (root / "etc/chute/chute.yaml").read_text() == (SYSTEMD / "chute.yaml").read_text()
    unit = root / "etc/systemd/system/chute.service"
    assert unit.read_text() == UNIT.read_text()
    # The installed unit as systemd would load it; its ExecStart lives under the test's root.
    here = tmp_path / "chute.service"
    here.write_text(unit.read_text().replace(f"ExecStart={VENV_CHUTE} ", f"ExecStart={chute} "))
    p = subprocess.run(
        ["systemd-analyze", "verify", str(here)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert (p.returncode, p.stdout + p.stderr) == (0, "")
    # Again, as an upgrade does: it succeeds and keeps the operator's config.
    (root / "etc/chute/chute.yaml").write_text("spool: /var/spool/chute\npolicy: backfill\n")
    install()
    assert "policy: backfill" in (root / "etc/chute/chute.yaml").read_text()
    _check_users_and_spool(root)


OWNER_UID, OWNER_GID, MEMBER_GID = 4242, 4242, 4343  # stand-ins for chute, chute, chute-submit


def _lay_out_as_tmpfiles(spool: Path) -> None:
    """The spool's folders with chute.tmpfiles.conf's modes, owned by stand-in ids."""
    gid = {"chute": OWNER_GID, "chute-submit": MEMBER_GID}
    for path, (mode, user, group) in _tmpfiles_paths().items():
        if not path.startswith("/var/spool/chute"):
            continue
        folder = spool / path.removeprefix("/var/spool/chute").lstrip("/")
        folder.mkdir(exist_ok=True)
        os.chown(folder, OWNER_UID if user == "chute" else 0, gid[group])
        os.chmod(folder, int(mode, 8))


# The CLI as a member of the submit group: no DAC override, only MEMBER_GID.
AS_MEMBER = (
    "setpriv",
    f"--regid={MEMBER_GID}",
    "--clear-groups",
    "--bounding-set=-dac_override,-dac_read_search",
)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux) to act as a member of the submit group",
)
@pytest.mark.slow
def test_a_member_of_the_submit_group_submits_and_reads_status_on_the_tmpfiles_layout(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    _lay_out_as_tmpfiles(spool)
    daemon_factory().start()
    status = chute("status", prefix=AS_MEMBER)
    assert status.code == 0, status.err
    assert "chute daemon pid" in status.out
    job_file = tmp_path / "hello.yaml"
    job_file.write_text(job("member-job", "echo hi"))
    submitted = chute("submit", str(job_file), prefix=AS_MEMBER)
    assert submitted.code == 0, submitted.err
    assert final_run(spool, "incoming/hello.yaml")["state"] == "succeeded"
    for command in (["schedules"], ["runs"], ["show", "latest"]):
        p = chute(*command, prefix=AS_MEMBER)
        assert p.code == 0, (command, p.err)
    slow = tmp_path / "slow.yaml"
    slow.write_text(job("member-slow", "sleep 60"))
    assert chute("submit", str(slow), prefix=AS_MEMBER).code == 0
    started = wait_for(
        "the slow job to run",
        lambda: [r for r in runs_of(spool, "incoming/slow.yaml") if r["state"] == "running"],
        30,
    )
    run_id = started[0]["run_id"]
    cancelled = chute("cancel", run_id, prefix=AS_MEMBER)  # a request through the control/ drop box
    assert cancelled.code == 0, cancelled.err
    assert final_run(spool, "incoming/slow.yaml")["state"] == "cancelled"
    # The layout before state/ was the group's: a clear error, not a traceback.
    os.chown(spool / "state", OWNER_UID, OWNER_GID)
    denied = chute("status", prefix=AS_MEMBER)
    assert denied.code == 2
    assert "cannot read" in denied.err
    assert "state" in denied.err
    assert "Traceback" not in denied.err
