"""chute.faults: a named crash point kills the process there, and only there."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import chute_env

SCRIPT = """
from chute.faults import crash_point
for i in range(3):
    print("before", i, flush=True)
    crash_point("demo")
    crash_point("other")
print("end", flush=True)
"""


@pytest.mark.parametrize(
    ("armed", "code", "out"),
    [
        ("", 0, "before 0\nbefore 1\nbefore 2\nend\n"),
        ("demo", -signal.SIGKILL, "before 0\n"),
        ("demo:2", -signal.SIGKILL, "before 0\nbefore 1\n"),
        ("nothere, other:3", -signal.SIGKILL, "before 0\nbefore 1\nbefore 2\n"),
    ],
    ids=["unset", "first-time", "second-time", "several-points"],
)
def test_a_crash_point_kills_the_process_at_the_named_instant(
    armed: str, code: int, out: str
) -> None:
    env = chute_env({"CHUTE_CRASH_AT": armed} if armed else None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout) == (code, out)
