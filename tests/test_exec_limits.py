"""A command or environment too big for exec is refused when the file is checked, and a
start that still meets the kernel's limit says which string is to blame."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Chute
from daemon_proc import Daemon, daemon_factory, drop, final_run, job

__all__ = ["daemon_factory"]

BIG = 200_000  # over the kernel's 131,072 bytes per argument or NAME=value


def test_a_variable_over_the_kernels_limit_is_a_validation_error(
    chute: Chute, write_spec: Callable[[str, str], Path]
) -> None:
    path = write_spec("big.yaml", job("big", "true", f"  env: {{BIG: '{'x' * BIG}'}}\n"))
    done = chute("validate", str(path))
    assert done.code == 2
    assert done.err.strip() == (
        f"{path}:6: spec.env.BIG: is 200,005 bytes; the kernel starts no program with "
        "NAME=value over 131,072 bytes — put the data in a file and pass its path"
    )


def test_a_command_over_the_kernels_limit_is_a_validation_error(
    chute: Chute, write_spec: Callable[[str, str], Path]
) -> None:
    path = write_spec("big.yaml", job("big", "echo " + "x" * BIG))
    done = chute("validate", str(path))
    assert done.code == 2
    assert done.err.strip() == (
        f"{path}:5: spec.run: is 200,006 bytes; the kernel starts no program with one "
        "argument over 131,072 bytes — put the data in a file and pass its path"
    )


def test_a_command_and_environment_over_arg_max_together_are_refused(
    chute: Chute, write_spec: Callable[[str, str], Path], tmp_path: Path
) -> None:
    env = "".join(f"    V{i}: '{'x' * 120_000}'\n" for i in range(20))
    path = write_spec("many.yaml", job("many", "true", f"  env:\n{env}"))
    config = tmp_path / "big-files.yaml"
    config.write_text("max_file_size: 8MiB\n")
    done = chute("validate", str(path), "--config", str(config))
    assert done.code == 2
    assert done.err.strip() == (
        f"{path}:5: spec: its command and environment come to 2.29MiB; a program starts with "
        "at most 1.94MiB of both (the kernel's 2MiB ARG_MAX, less room for chute's own "
        "variables) — put the data in a file and pass its path"
    )


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_exec_refused_by_the_kernel_names_the_biggest_variable(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    """A daemon with a 1 MiB stack has a 256 KiB ARG_MAX: a file that passed validation can
    still meet it at start, and the attempt's error must name the variable, not PATH."""
    d = daemon_factory("cpus: 1\n")
    d.start()
    assert d.proc is not None
    pid = d.proc.pid
    subprocess.run(["prlimit", f"--pid={pid}", "--stack=1048576"], check=True)
    env = "".join(f"    V{i}: '{'x' * 100_000}'\n" for i in range(3))
    drop(spool, "big.yaml", job("big", "true", f"  env:\n{env}"))
    rec = final_run(spool, "incoming/big.yaml")
    assert rec["state"] == "failed"
    assert rec["error"].startswith(
        "stage big failed: cannot start /bin/sh: its command and environment are "
    ), rec["error"]
    assert "over the kernel's limit (the biggest is variable V" in rec["error"]
    assert d.stop() == 0
