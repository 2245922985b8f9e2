"""A spool on a filesystem of its own, for the benchmarks' `sync: syncfs` measurements.

An operator who wants chute's full burst rate gives the spool its own filesystem (a
partition, an LV); there `sync: auto` picks syncfs(2), two per group commit, instead of an
fsync per file and folder. The benchmarks build the same thing on this machine: a fresh
ext4 (mkfs.ext4 defaults) on a loop device backed by a sparse file on the root disk, so
the same disk serves both measurements. It needs root, mkfs.ext4 and a free loop device;
without them the own-filesystem rows say why they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIZE = 8 << 30  # sparse: ext4 makes 512k inodes, enough for 10,000 runs and more


def unavailable() -> str | None:
    """Why this machine cannot mount a filesystem for the benchmark, or None."""
    if os.geteuid() != 0:
        return "needs root (mount)"
    if shutil.which("mkfs.ext4") is None:
        return "needs mkfs.ext4 (e2fsprogs)"
    if not Path("/dev/loop-control").exists():
        return "needs loop devices (/dev/loop-control)"
    return None


@contextmanager
def own_filesystem() -> Iterator[Path]:
    """A fresh, empty ext4 mounted on a temp folder; unmounted and deleted afterwards."""
    work = Path(tempfile.mkdtemp(prefix="chute-ownfs-", dir="/var/tmp"))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(SIZE)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
