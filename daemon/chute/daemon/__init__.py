"""The daemon: one loop that takes dropped files, fires schedules and drives runs.

The package, by concept: `service` (the parts, the loop's `step`, start and stop), `lock`
(one daemon per spool), `watch` (inotify and rescans), `admission` (which files are taken,
backpressure), `fires` (schedules at run time), `requests` (control/), `ends` (what
follows a run's end), `recovery` (start-up), `status` (status.json, gauges, /healthz),
`upkeep` (report pages, retention passes), `reload` (SIGHUP).
"""

from .admission import MAX_ACTIVE_RUNS, MAX_ACTIVE_TASKS
from .lock import SpoolLocked, acquire_lock, daemon_pid, lock_if_free
from .service import EXIT_CANNOT_START, Daemon

__all__ = [
    "EXIT_CANNOT_START",
    "MAX_ACTIVE_RUNS",
    "MAX_ACTIVE_TASKS",
    "Daemon",
    "SpoolLocked",
    "acquire_lock",
    "daemon_pid",
    "lock_if_free",
]
