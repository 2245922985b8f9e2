"""Where things live: the spool's folders, resolved once.

Owns: the spool layout of docs/spool.md (incoming/, queue/, schedules/, rejected/, control/,
runs/, pipelines/, cache/, state/). Not here: what moves between them (chute.intake.drops),
what a run folder holds (chute.store.rundir).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chute.config import Config
from chute.store import groupcommit

FOLDERS = (
    "incoming",
    "queue",
    "schedules",
    "rejected",
    "control",
    "pipelines",
    "cache",
    "state",
)


@dataclass(frozen=True, slots=True)
class Spool:
    root: Path
    runs: Path

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def schedules(self) -> Path:
        return self.root / "schedules"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def pipelines(self) -> Path:
        return self.root / "pipelines"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def ensure(self) -> None:
        """Create missing folders (the daemon and `chute run` both call this)."""
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """OSError, naming the folder, for the first folder a file cannot be made in (a
        read-only mount, modes): at start, not at the first run that needs it."""
        for folder in (*(self.root / name for name in FOLDERS), self.runs):
            probe = folder / f".probe-{os.getpid()}"
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                os.unlink(probe)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(folder)) from None


def resolve_spool(arg: str | Path | None, config: Config) -> Spool:
    """`--spool`, else $CHUTE_SPOOL, else the config's `spool`, else ./spool."""
    if arg is not None:
        root = Path(arg)
    elif os.environ.get("CHUTE_SPOOL"):
        root = Path(os.environ["CHUTE_SPOOL"])
    elif config.spool is not None:
        root = config.spool
    else:
        root = Path("spool")
    root = root.absolute()
    runs = config.runs_dir.absolute() if config.runs_dir is not None else root / "runs"
    return Spool(root=root, runs=runs)


def sync_roots(config: Config, spool: Spool) -> list[Path]:
    """Filesystems the run writes go to sync whole (config `sync`); [] means an fsync per
    file and folder."""
    return groupcommit.own_filesystems(config.sync, [spool.root, spool.runs])
