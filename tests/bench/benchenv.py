"""How the benchmarks start chute: from this checkout, as an installed copy would start.

`pip install` compiles every module to bytecode; a checkout gets its `__pycache__` on
first import, unless PYTHONDONTWRITEBYTECODE is set (as it is on this project's
machines): then every `chute` command compiles the whole package again, about 130 ms of
each command (and of the pool's forkserver) that no installed daemon pays. `prepare()`
compiles it once, explicitly, before anything is timed.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "daemon" / "chute"


def prepare() -> None:
    """Bytecode for every module of the package, as an install leaves it."""
    if not compileall.compile_dir(str(PACKAGE), quiet=1):
        raise SystemExit(f"cannot compile {PACKAGE}")


def settle() -> None:
    """Start a measurement from a quiet disk: write back what earlier ones left dirty.

    Temp spools are deleted only at the end of each benchmark: on ext4 without a journal
    (this machine's root) each file created scans past every inode freed in the last 60 s
    of its block group (360 s while their inode table is dirty: `recently_deleted()` in
    ext4's inode allocator), so deleting one measurement's thousands of files halves the
    throughput of the next one."""
    os.sync()


def env() -> dict[str, str]:
    """The environment to run `python -m chute` from this checkout in."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("CHUTE_")}
    e["PYTHONPATH"] = str(REPO / "daemon")
    return e
