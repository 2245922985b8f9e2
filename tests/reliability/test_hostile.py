"""Scenario 5: hostile files. Pass: never a crash or traceback; each gets one rejection with
a reason (exit 2 from `chute validate`); the daemon keeps taking good files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chute.spec import SpecError, load_bytes
from conftest import Chute, chute_env, load_json, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, http_address, job, runs_of

__all__ = ["daemon_factory"]


def _bomb_line(i: int) -> bytes:
    a, b = chr(97 + i), chr(98 + i)
    return f"{b}: &{b} [*{a},*{a},*{a}]\n".encode()


HEADER = "apiVersion: chute/v1\nkind: Job\nmetadata: {name: x}\nspec:\n  run: 'true'\n"
HOSTILE: dict[str, bytes] = {
    "alias_bomb.yaml": (
        b'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
        + b"".join(_bomb_line(i) for i in range(20))
    ),
    "deep.yaml": b"[" * 30000 + b"]" * 30000,
    "deep_block.yaml": b"- " * 20000 + b"x\n",
    "not_utf8.yaml": b"apiVersion: chute/v1\nkind: Job\nmetadata: {name: \xff\xfe}\n",
    "nul.yaml": HEADER.encode() + b"\x00\x00",
    "binary.yaml": bytes(range(256)) * 40,
    "empty.yaml": b"",
    "list.yaml": b"- a\n- b\n",
    "tags.yaml": b"!!python/object/apply:os.system ['touch /tmp/chute-pwned']\n",
}


def test_hostile_files_are_each_rejected_with_a_reason_and_the_daemon_goes_on(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon_factory("max_file_size: 1MiB\n").start()
    big = tmp_path / ".big.tmp"
    with open(big, "wb") as f:
        f.truncate(50 << 20)  # 50 MB: refused by size, never read
    os.rename(big, spool / "incoming" / "big.yaml")
    for name, data in HOSTILE.items():
        path = spool / "incoming" / f".{name}.tmp"
        path.write_bytes(data)
        os.rename(path, spool / "incoming" / name)
    names = [*HOSTILE, "big.yaml"]

    def all_rejected() -> bool:
        return all((spool / "rejected" / f"{n}.error.json").exists() for n in names)

    wait_for("every hostile file rejected", all_rejected, timeout=30)
    for n in names:
        doc = orjson.loads((spool / "rejected" / f"{n}.error.json").read_bytes())
        assert doc["reason"], n
        assert doc["errors"], n
        assert all(e["message"] for e in doc["errors"]), n
    assert orjson.loads((spool / "rejected" / "big.yaml.error.json").read_bytes())["reason"] == (
        "too_large"
    )
    assert not Path("/tmp/chute-pwned").exists()
    drop(spool, "fine.yaml", job("fine", "true"))
    assert final_run(spool, "incoming/fine.yaml")["state"] == "succeeded"
    assert d.stop() == 0
    assert "Traceback" not in d.log.read_text()


@pytest.mark.parametrize(
    "name",
    ["with space.yaml", "ünïcødé-名前.yaml", "new\nline.yaml", "tab\there.yaml", "-dash.yaml"],
    ids=["space", "unicode", "newline", "tab", "dash"],
)
@pytest.mark.slow
def test_odd_names_run_and_keep_their_name(
    spool: Path, daemon_factory: Callable[..., Daemon], name: str
) -> None:
    d = daemon_factory().start()
    drop(spool, name, job("odd", "true"))
    assert final_run(spool, f"incoming/{name}")["state"] == "succeeded"
    assert d.stop() == 0


@pytest.mark.slow
@settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.one_of(st.binary(max_size=2000), st.text(max_size=2000).map(str.encode)))
def test_thousands_of_random_documents_give_spec_errors_only(data: bytes) -> None:
    issues = _issues(data)
    assert issues is None or issues
    assert all(i.startswith("fuzz.yaml") for i in issues or [])


def _issues(data: bytes) -> list[str] | None:
    """None when the document is valid; else its issues (anything else raised fails)."""
    try:
        load_bytes(data, "fuzz.yaml", node_cpus=2, node_memory=1 << 30)
    except SpecError as exc:
        return [str(i) for i in exc.issues]
    return None


YAMLISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_random_structures_under_spec_give_spec_errors_only(value: object) -> None:
    doc = {"apiVersion": "chute/v1", "kind": "Pipeline", "metadata": {"name": "f"}, "spec": value}
    issues = _issues(orjson.dumps(doc))
    assert issues is None or issues


@pytest.mark.slow
def test_chute_validate_answers_hostile_files_with_exit_2_quickly(tmp_path: Path) -> None:
    for name, data in HOSTILE.items():
        path = tmp_path / name
        path.write_bytes(data)
        start = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "chute", "validate", str(path)],
            env=chute_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 2, name
        assert p.stderr.startswith(str(path)), (name, p.stderr)
        assert "Traceback" not in p.stderr
        assert time.monotonic() - start < 5, name


# -- control/ is a drop box too -----------------------------------------------------------------

# name in control/ -> (what to put there, reason, what the message says)
CONTROL = {
    "array.json": (b"[]", "bad_request", "is a JSON array, not an object"),
    "string.json": (b'"x"', "bad_request", "is a JSON string, not an object"),
    "number.json": (b"1", "bad_request", "is a JSON number, not an object"),
    "null.json": (b"null", "bad_request", "is a JSON null, not an object"),
    "garbage.json": (b"\xff\x00{", "bad_request", "is not JSON"),
    "unknown-action.json": (b'{"action": "reboot"}', "bad_request", "reboot is not an action"),
    "missing-run.json": (b'{"action": "cancel"}', "bad_request", "missing; a cancel request"),
    "mistyped-run.json": (b'{"action": "cancel", "run": 7}', "bad_request", "7: not a run id"),
    "cancel-traversal.json": (
        b'{"action": "cancel", "run": "../queue/{waiting}"}',
        "bad_request",
        "../queue/{waiting}: not a run id",
    ),
    "unschedule-traversal.json": (
        b'{"action": "unschedule", "name": "../queue/{waiting}"}',
        "bad_request",
        "../queue/{waiting}: not a schedule name",
    ),
    "unschedule-absolute.json": (
        b'{"action": "unschedule", "name": "{canary}/keep"}',
        "bad_request",
        "{canary}/keep: not a schedule name",
    ),
    "retry-into-queue.json": (
        b'{"action": "retry", "run": "{old}", "new_run_id": "../queue"}',
        "bad_request",
        "../queue: not a run id",
    ),
    "retry-outside.json": (
        b'{"action": "retry", "run": "{old}", "new_run_id": "../../canary"}',
        "bad_request",
        "../../canary: not a run id",
    ),
    "retry-absolute.json": (
        b'{"action": "retry", "run": "{old}", "new_run_id": "{canary}"}',
        "bad_request",
        "not a run id",
    ),
    "retry-over-another-run.json": (
        b'{"action": "retry", "run": "{old}", "new_run_id": "{taken}"}',
        "bad_request",
        "retry refused: {taken}: that run id is taken by another run",
    ),
    "retry-of-a-running-run.json": (
        b'{"action": "retry", "run": "{waiting}", "new_run_id": "20261231_235959_00ab01"}',
        "bad_request",
        "retry refused: {waiting}: still running; retry it once it has ended",
    ),
    "retry-unknown-stage.json": (
        b'{"action": "retry", "run": "{old}", "from": "nope", '
        b'"new_run_id": "20261231_235959_00ab02"}',
        "bad_request",
        "retry refused: --from nope: no such stage in {old} (stages: old)",
    ),
    "oversized.json": (b" " * 5000 + b"{}", "too_large", "is over 4096 bytes"),
    "link.json": ("symlink", "symlink", "is a symbolic link, not the request"),
    "hard-link.json": ("hardlink", "not_regular", "has 2 hard links; a request must be a file"),
    "world-writable.json": ("open", "world_writable", "is world-writable (mode 0666)"),
    "fifo.json": ("fifo", "not_regular", "is a FIFO, not a regular file"),
    "folder.json": ("folder", "not_regular", "is a directory, not a regular file"),
}
LEFT_ALONE = [".being-written.json", "notes.txt"]


def _metric(address: str, name: str, reason: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f'{name}{{reason="{reason}"}}'))
    return float(line.split()[-1])


@pytest.mark.slow
def test_bad_control_files_are_rejected_with_a_reason_and_the_daemon_goes_on(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.yaml").write_text("keep\n")
    gate = tmp_path / "go"
    config = "cpus: 2\nstop_timeout: 500ms\nkill_grace: 500ms\n"
    d = daemon_factory(config).start()
    drop(spool, "old.yaml", job("old", "true"))
    drop(spool, "taken.yaml", job("taken", "true"))
    drop(spool, "waiting.yaml", job("waiting", f"test -e {gate} || sleep 1000"))
    old = final_run(spool, "incoming/old.yaml")["run_id"]
    taken = final_run(spool, "incoming/taken.yaml")["run_id"]
    waiting = wait_for(
        "the waiting run to run",
        lambda: [r for r in runs_of(spool, "incoming/waiting.yaml") if r["state"] == "running"],
    )[0]
    fill = {"{old}": old, "{taken}": taken, "{waiting}": waiting["run_id"], "{canary}": str(canary)}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    before = {p.name: p.read_bytes() for p in (spool / "queue").iterdir()}
    runs_before = sorted(p.name for p in (spool / "runs").iterdir())
    taken_json = (spool / "runs" / taken / "run.json").read_bytes()
    control = spool / "control"
    for name in LEFT_ALONE:
        (control / name).write_text('{"action": "cancel"}')
    for name, (what, _, _) in CONTROL.items():
        if what == "symlink":
            os.symlink(canary / "keep.yaml", control / name)
        elif what == "fifo":
            os.mkfifo(control / name)
        elif what == "folder":
            (control / name).mkdir()
        elif what in ("hardlink", "open"):  # a cancel of the waiting run: whose is it?
            tmp = control / f".{name}.tmp"
            tmp.write_bytes(filled('{"action": "cancel", "run": "{waiting}"}').encode())
            if what == "open":
                tmp.chmod(0o666)
                os.rename(tmp, control / name)
            else:
                os.link(tmp, canary / "other-name")
                os.rename(tmp, control / name)
        else:
            assert isinstance(what, bytes)
            tmp = control / f".{name}.tmp"
            tmp.write_bytes(filled(what.decode("latin-1")).encode("latin-1"))
            os.rename(tmp, control / name)

    def all_rejected() -> bool:
        return all((spool / "rejected" / f"{n}.error.json").exists() for n in CONTROL)

    wait_for("every bad request rejected", all_rejected, 30)
    assert d.proc is not None
    assert d.proc.poll() is None
    for name, (_, reason, message) in CONTROL.items():
        doc = orjson.loads((spool / "rejected" / f"{name}.error.json").read_bytes())
        assert (doc["file"], doc["reason"]) == (name, reason), name
        assert filled(message) in doc["errors"][0]["message"], (name, doc)
        assert os.path.lexists(spool / "rejected" / name), name
    assert sorted(os.listdir(control)) == sorted(LEFT_ALONE)
    bad = sum(1 for _, reason, _ in CONTROL.values() if reason == "bad_request")
    assert _metric(http_address(spool), "chute_files_rejected_total", "bad_request") == bad
    assert {p.name: p.read_bytes() for p in (spool / "queue").iterdir()} == before
    assert sorted(p.name for p in (spool / "runs").iterdir()) == runs_before  # no new run
    assert (spool / "runs" / taken / "run.json").read_bytes() == taken_json
    assert sorted(os.listdir(canary)) == ["keep.yaml", "other-name"]
    assert (canary / "keep.yaml").read_text() == "keep\n"
    text = d.log.read_text()
    assert "Traceback" not in text
    assert text.count("WARNING control/") == len(CONTROL)
    assert d.stop() == 0
    gate.touch()
    d2 = daemon_factory(config).start()  # nothing left in control/ to trip a restart
    assert final_run(spool, "incoming/waiting.yaml")["state"] == "succeeded"
    assert d2.stop() == 0
    assert "Traceback" not in d2.log.read_text()


@pytest.mark.parametrize("where", ["daemon", "foreground"])
def test_retry_copies_only_files_folders_and_links_inside_whatever_the_old_run_holds(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path, where: str
) -> None:
    """A FIFO, a socket-like special file, a link out and a stage folder swapped for a link:
    the retry neither blocks nor follows; it copies what is a file, folder or inner link.
    The same by the daemon and by `chute retry` in the foreground (no daemon)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "output.json").write_text('{"_meta": {}, "data": {"stolen": true}}')
    (outside / "secret").write_text("secret\n")
    spec = (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: fifo}\nspec:\n  stages:\n"
        "    - {name: one, run: 'echo 1 > $CHUTE_ARTIFACTS/real; mkdir $CHUTE_ARTIFACTS/sub'}\n"
        "    - {name: swapped, run: 'true'}\n"
        f"    - {{name: last, dependsOn: [one, swapped], run: 'test -e {tmp_path}/go'}}\n"
    )
    d = daemon_factory().start() if where == "daemon" else None
    if d is not None:
        drop(spool, "fifo.yaml", spec)
        old = final_run(spool, "incoming/fifo.yaml")
    else:
        (tmp_path / "fifo.yaml").write_text(spec)
        assert chute("run", str(tmp_path / "fifo.yaml")).code == 1
        [old] = runs_of(spool)
    assert old["state"] == "failed"
    old_dir = spool / "runs" / old["run_id"]
    artifacts = old_dir / "stages" / "one" / "artifacts"
    os.mkfifo(artifacts / "pipe")  # left there after the run ended
    os.symlink(outside / "secret", artifacts / "out")
    os.symlink("../real", artifacts / "sub" / "inner")
    shutil.rmtree(old_dir / "stages" / "swapped")
    os.symlink(outside, old_dir / "stages" / "swapped")
    (tmp_path / "go").touch()
    done = chute("retry", old["run_id"], *(["--wait"] if d is not None else []), timeout=60)
    assert done.code == 0, done.err
    [new_id] = [r["run_id"] for r in runs_of(spool) if r["run_id"] != old["run_id"]]
    new_dir = spool / "runs" / new_id
    copied = new_dir / "stages" / "one" / "artifacts"
    assert sorted(p.name for p in copied.iterdir()) == ["real", "sub"]
    assert os.readlink(copied / "sub" / "inner") == "../real"
    manifest = {s["name"]: s for s in load_json(new_dir / "manifest.json")["stages"]}
    assert manifest["swapped"]["state"] == "succeeded"  # run again: its folder was a link
    assert manifest["swapped"]["attempts"]  # (a kept stage has no attempt of its own here)
    assert not (new_dir / "stages" / "swapped").is_symlink()
    assert load_json(new_dir / "stages" / "swapped" / "output.json")["data"] is None
    assert "Traceback" not in done.err
    if d is not None:
        assert "kept stage one without 2 entries" in d.log.read_text()
        assert d.stop() == 0
    else:
        assert "kept stage one without 2 entries" in done.err
        assert load_json(new_dir / "run.json")["state"] == "succeeded"
