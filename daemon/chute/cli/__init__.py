"""The `chute` command: one subcommand per verb, exit codes 0 ok, 1 failed, 2 usage or input.

The package, by concept: `parser` (the parser and `main`, the console script), `common`
(exit codes, UsageError, a command's arguments made into a config, spool, topology,
pipeline or run folder), `validate` (checking files, the stage plan), `foreground` (`run`
and `retry`: one run in this process, the progress line), `show` (`show`, `logs`, `runs`:
what runs did), `submit` (`submit`, following a run the daemon drives), `daemon` (`daemon`,
`status`, `cancel`, `schedules`, `unschedule`, `gc`: asking the daemon), `schema`.
Not here: what the commands do (chute.engine, chute.store.rundir, chute.spec,
chute.intake.submission).
"""

from .parser import main

__all__ = ["main"]
