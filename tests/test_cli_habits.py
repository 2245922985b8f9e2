"""The CLI's habits a script relies on, through the real command: --version, --json
listings, cancelling by selector, log tails, durations and where the daemon listens."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import REPO, chute_env


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chute", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=chute_env(env),
    )


def test_version_prints_the_version_the_package_and_its_metric_carry() -> None:
    from chute import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = _cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"chute {project}\n", "")
    assert __version__ == project
    assert "--version" in _cli("--help").stdout
