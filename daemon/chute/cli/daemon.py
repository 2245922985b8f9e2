"""The CLI's side of the daemon: `chute daemon`, and the commands that ask it or act beside it.

Owns: `chute daemon`, `status`, `cancel`, `schedules`, `unschedule` and `gc`, and what
other commands use to ask the daemon: whether one runs on the spool (its lock), its
state/status.json, and waiting for a control request to take effect or be refused. Not
here: the daemon (chute.daemon), the requests' form and files (chute.intake.control),
retention (chute.store.retention), following a run (chute.cli.submit).
Crash safety: a request is acknowledged to the user only once the daemon has carried it
out (the run ended, the schedule file is gone); without a daemon, `cancel` and
`unschedule` act themselves while holding the spool lock, so none starts meanwhile.
Diagnostics: a request the daemon refused is a UsageError with its reasons and the path of
its error.json; a daemon's state/ this user may not read is one line that says who may.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from chute import names
from chute.cli import common
from chute.cli.common import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, UsageError
from chute.config import LISTEN_OPTION
from chute.engine import recovery
from chute.execution import leftovers
from chute.intake import control
from chute.intake.rejections import ERROR_SUFFIX
from chute.observe import logs
from chute.store import queue, retention, rundir
from chute.store.spool import Spool
from chute.units import format_duration, format_size

POLL = 0.05  # seconds between looks at what a request changes
CANCEL_WAIT = 30.0  # seconds, beyond the config's kill_grace, `cancel` waits for the run's end
UNSCHEDULE_WAIT = 10.0  # seconds `unschedule` waits for the daemon to remove the file


def daemon_pid(spool: Spool) -> int | None:
    """The pid of the daemon running on `spool`; None when none does."""
    from chute.daemon import daemon_pid as locked_by

    try:
        return locked_by(spool)
    except PermissionError as exc:
        raise UsageError(_unreadable(spool, exc)) from None


def _unreadable(spool: Spool, exc: OSError) -> str:
    return (
        f"cannot read {exc.filename or spool.state}: {exc.strerror}; this command reads the "
        f"daemon's {spool.state}/ (under systemd, members of chute-submit may: see "
        "systemd/README.md)"
    )


def status_path(spool: Spool) -> Path:
    return spool.state / "status.json"


def read_status(spool: Spool) -> dict[str, Any] | None:
    """state/status.json as the last daemon on `spool` wrote it; None when there is none (or
    it is not a JSON object)."""
    try:
        doc = rundir.read_json(status_path(spool))
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def daemon_status(spool: Spool) -> dict[str, Any] | None:
    """state/status.json of the daemon running on `spool`; None without one (or before it
    wrote one)."""
    if daemon_pid(spool) is None:
        return None
    return read_status(spool)


def wait_for(spool: Spool, request: Path, done: Callable[[], bool], seconds: float) -> bool:
    """Poll until `done()` (True), the daemon refuses `request` (UsageError), or `seconds`
    have passed (False)."""
    deadline = time.monotonic() + seconds
    while not done():
        _raise_if_rejected(spool, request)
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def _raise_if_rejected(spool: Spool, request: Path) -> None:
    """UsageError with the daemon's reason once it has moved `request` to rejected/."""
    error_json = spool.rejected / f"{request.name}{ERROR_SUFFIX}"
    if request.exists() or not error_json.exists():
        return
    try:
        doc = rundir.read_json(error_json)
        messages = "; ".join(str(e.get("message")) for e in doc.get("errors", []))
    except (OSError, ValueError, AttributeError):
        messages = "see the daemon's log"
    raise UsageError(f"the daemon refused the request: {messages} ({error_json})")


# -- the commands ----------------------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from chute.daemon import Daemon, SpoolLocked
    from chute.observe.http import HttpError, parse_listen

    config = common.config(args)  # $CHUTE_LISTEN applied (chute.config)
    if args.listen is not None:
        config = dataclasses.replace(
            config, http_listen=args.listen, http_listen_from=LISTEN_OPTION
        )
    if config.http_listen_from != "http.listen":  # a mistake there is this command's
        try:
            parse_listen(config.http_listen, config.http_listen_from)
        except HttpError as exc:
            raise UsageError(str(exc)) from None
    spool = common.spool(args, config)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logs.setup(level, config.log_format)
    try:
        return Daemon(spool, config, args.config).run()
    except SpoolLocked as exc:
        raise UsageError(str(exc)) from None


def cmd_status(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    pid = daemon_pid(spool)
    if args.json:  # status.json as the daemon wrote it; null without one (or before it has)
        common.print_json(None if pid is None else read_status(spool))
        return EXIT_NOT_RUNNING if pid is None else EXIT_OK
    if pid is None:
        print(f"chute daemon is not running on {spool.root}")
        return EXIT_NOT_RUNNING
    st = read_status(spool)
    if st is None:
        print(f"chute daemon pid {pid} on {spool.root}: starting (no status yet)")
        return EXIT_OK
    total = sum(n["total"] for n in st["cpus"])
    used = sum(n["allocated"] for n in st["cpus"])
    nodes = ", ".join(f"node {n['numa_node']}: {n['allocated']}/{n['total']}" for n in st["cpus"])
    print(
        f"chute daemon pid {st['pid']} on {st['spool']}, up since {st['started_at']}, "
        f"policy {st['policy']}"
    )
    mem = st.get("memory")
    memory = (
        f"; memory: {format_size(mem['total'] - mem['free'])} of {format_size(mem['total'])} "
        "allocated"
        if mem
        else ""
    )
    print(f"cpus: {used}/{total} allocated ({nodes}){memory}")
    tasks = st["tasks"]
    why = ", ".join(f"{n} for {r}" for r, n in tasks.get("waiting_for", {}).items() if n)
    retrying = tasks.get("retrying", 0)
    print(
        f"runs: {st['runs']['queued']} queued, {st['runs']['running']} running; "
        f"tasks: {tasks['running']} running, {tasks['waiting']} waiting"
        + (f" ({why})" if why else "")
        + (f", {retrying} waiting out a retry delay" if retrying else "")
        + f"; schedules: {st['schedules']}"
    )
    upcoming = st.get("next_fire")
    if upcoming:
        print(f"next fire: schedule {upcoming['schedule']} at {upcoming['at']}")
    for h in st.get("held", []):
        behind = ", ".join(h["behind"]) or "its previous run"
        print(
            f"held: schedule {h['schedule']} fire {h['fire_time']} (run {h['run_id']}) waits "
            f"for {behind} to end (overlap: queue)"
        )
    waiting = {w["run_id"]: w for w in st.get("waiting", [])}
    rows = [["RUN", "PIPELINE", "STATE", "CREATED", "WAITING FOR", "QUEUE"]]
    for run_id in queue.run_ids(spool)[:50]:
        try:
            rec = rundir.read_json(spool.runs / run_id / "run.json")
        except (OSError, orjson.JSONDecodeError):
            continue
        w = waiting.get(rec["run_id"], {})
        rows.append(
            [
                rec["run_id"],
                rec["pipeline"],
                rec["state"],
                rec["created_at"],
                w.get("for", "-"),
                str(w.get("position") or "-"),
            ]
        )
    if len(rows) > 1:
        print("\n".join(common.table(rows)))
    return EXIT_OK


CANCEL_STATES = ("queued", "running")  # what `cancel --state` selects by


def cmd_cancel(args: argparse.Namespace) -> int:
    from chute.daemon import lock_if_free

    config = common.config(args)
    spool = common.spool(args, config)
    folders = _to_cancel(spool, args)
    code = EXIT_OK
    todo: list[Path] = []
    for folder in folders:
        state = _state(folder)
        if state in rundir.FINAL_RUN_STATES:
            print(f"{folder.name} already {state}")
        else:
            todo.append(folder)
    if not todo:
        return code
    lock = None if daemon_pid(spool) is not None else lock_if_free(spool)
    if lock is None:
        # One durable request per run, all written before any wait: the daemon ends them
        # side by side, and each is acknowledged once its run has ended.
        requests = [(folder, control.submit(spool, control.Cancel(folder.name))) for folder in todo]
        deadline = time.monotonic() + config.kill_grace + CANCEL_WAIT
        for folder, request in requests:

            def ended(folder: Path = folder) -> bool:
                return _state(folder) in rundir.FINAL_RUN_STATES

            try:
                if wait_for(spool, request, ended, max(0.0, deadline - time.monotonic())):
                    print(f"{folder.name} {_state(folder)}")
                    continue
            except UsageError as exc:  # the daemon refused this one: say so, follow the rest
                print(exc, file=sys.stderr)
                code = max(code, EXIT_USAGE)
                continue
            print(
                f"{folder.name}: cancel requested; the daemon has not finished it yet",
                file=sys.stderr,
            )
            code = max(code, EXIT_FAILED)
        return code
    # No daemon, and none starts while we hold its lock: nothing runs; a queued or
    # interrupted run just will not start again.
    try:
        for folder in todo:
            state = _state(folder)
            if state in rundir.FINAL_RUN_STATES:
                print(f"{folder.name} already {state}")
                continue
            recovery.cancel_stopped(spool, folder.name, time.time())
            print(f"{folder.name} cancelled")
    finally:
        os.close(lock)
    return code


def _to_cancel(spool: Spool, args: argparse.Namespace) -> list[Path]:
    """The run folders `chute cancel` acts on: the runs named, then those the selectors
    (--pipeline, --state) pick among the runs not ended, each once, oldest first. Every
    name is checked before anything is cancelled."""
    if not args.runs and args.pipeline is None and args.state is None:
        raise UsageError(
            "chute cancel: name a run (RUN...), or select runs with --pipeline NAME and/or "
            f"--state {'|'.join(CANCEL_STATES)}"
        )
    if args.state is not None and args.state not in CANCEL_STATES:
        raise UsageError(
            f"--state: {args.state!r} is not a state cancel selects by; choose "
            f"{' or '.join(CANCEL_STATES)}"
        )
    if args.pipeline is not None:
        common.checked_name(names.name, args.pipeline, "pipeline name")
    folders = [common.find_run(spool, ref) for ref in args.runs]
    if args.pipeline is not None or args.state is not None:
        for run_id in rundir.run_ids(spool):
            try:
                rec = rundir.read_json(spool.runs / run_id / "run.json")
            except (OSError, orjson.JSONDecodeError):
                continue
            if rec.get("state") in rundir.FINAL_RUN_STATES:
                continue
            if args.state is not None and rec.get("state") != args.state:
                continue
            if args.pipeline is not None and rec.get("pipeline") != args.pipeline:
                continue
            folders.append(spool.runs / run_id)
        if len(folders) == len(args.runs):
            print(f"no run left to cancel matches {_selectors(args)}")
    unique = {f.name: f for f in folders}
    return [unique[name] for name in sorted(unique)]


def _selectors(args: argparse.Namespace) -> str:
    chosen = [("--pipeline", args.pipeline), ("--state", args.state)]
    return " ".join(f"{option} {value}" for option, value in chosen if value is not None)


def _state(folder: Path) -> str:
    return str(rundir.read_json(folder / "run.json")["state"])


def cmd_schedules(args: argparse.Namespace) -> int:
    from chute.scheduling.schedules import STATE_FILE, Schedules

    config = common.config(args)
    spool = common.spool(args, config)
    topo = common.topology(config)
    rows = [["NAME", "TRIGGER", "NEXT FIRE"]]
    # The daemon's record of last fires, read through a copy: Schedules saves what it is
    # told, and this command only looks.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            shutil.copy(spool.state / STATE_FILE, Path(tmp) / STATE_FILE)
        except FileNotFoundError:
            pass
        except PermissionError as exc:
            raise UsageError(_unreadable(spool, exc)) from None
        schedules = Schedules(Path(tmp))
        now = datetime.now(UTC)
        for path in sorted(spool.schedules.glob("*.yaml")):
            try:
                pipeline, _ = common.load(str(path), config, topo)
            except UsageError as exc:
                print(exc, file=sys.stderr)
                continue
            if pipeline.schedule is None:
                continue
            schedules.set(
                path.stem, pipeline.schedule, datetime.fromtimestamp(path.stat().st_mtime, UTC)
            )
        listing = schedules.listing(now)
    if args.json:
        common.print_json([{"name": n, "trigger": t, "next_fire": x} for n, t, x in listing])
        return EXIT_OK
    rows += [[name, trigger, nxt or "never"] for name, trigger, nxt in listing]
    print("\n".join(common.table(rows)))
    return EXIT_OK


def cmd_unschedule(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    name = common.checked_name(names.name, args.name, "schedule name")
    path = spool.schedules / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in spool.schedules.glob("*.yaml"))
        raise UsageError(f"{name}: no such schedule (schedules: {', '.join(known) or 'none'})")
    if daemon_pid(spool) is not None:
        request = control.submit(spool, control.Unschedule(name))
        if not wait_for(spool, request, lambda: not path.exists(), UNSCHEDULE_WAIT):
            print(f"{name}: unschedule requested; the daemon has not done it yet", file=sys.stderr)
            return EXIT_FAILED
    else:
        control.unschedule_file(spool, name)
    print(f"unscheduled {name}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    for run_id in leftovers.end_dead_foreground(spool, config.kill_grace):
        print(f"{run_id} interrupted: the `chute run` that ran it is gone")
    rules = retention.Rules.of(config)
    # A run a retry request in control/ names stays until the daemon has made the retry.
    removed = retention.gc(
        spool, rules, now=time.time(), active=control.retried_runs(spool), sweep=True
    )
    size = "no bound" if rules.cache_max_size is None else format_size(rules.cache_max_size)
    print(
        f"removed {len(removed.runs)} run(s) (keep_runs {rules.keep_runs}, "
        f"max_age {format_duration(rules.max_age)})"
    )
    print(f"removed {len(removed.links)} pipeline latest link(s) to removed runs")
    print(
        f"removed {len(removed.rejected)} rejected file(s) "
        f"(rejected_max_age {format_duration(rules.rejected_max_age)})"
    )
    print(
        f"removed {len(removed.cache)} cache entr{'y' if len(removed.cache) == 1 else 'ies'} "
        f"(cache_max_age {format_duration(rules.cache_max_age)}, cache_max_size {size})"
    )
    return EXIT_OK
