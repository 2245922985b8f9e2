"""Scenario 5: hostile files. Pass: never a crash or traceback; each gets one rejection with
a reason (exit 2 from `chute validate`); the daemon keeps taking good files."""

from __future__ import annotations

import os
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
from conftest import chute_env, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, job

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
