"""Handing files to the daemon and following their runs: `chute submit`, and `chute run`
beside a daemon.

Owns: what `submit` prints of each file's outcome (its run, schedule or rejection) and the
exit code it means (with --json, one document of every file's outcome instead), following
a run the daemon drives (a live line on a terminal, the summary at its end), and `chute
run` handing its file over (Ctrl-C cancels the run, a second stops following it). Not
here: placing a file and learning its outcome (chute.intake.submission), the cancel
request (chute.intake.control), the summary (chute.cli.show).
Diagnostics: a file that does not validate is a UsageError and nothing is submitted; a
rejected or vanished file exits 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from chute.cli import common
from chute.cli.common import EXIT_FAILED, EXIT_OK, UsageError
from chute.cli.daemon import daemon_pid
from chute.cli.show import summary
from chute.engine.stage import STAGE_OK
from chute.intake import control, submission
from chute.spec.model import Pipeline
from chute.store import rundir
from chute.store.spool import Spool

log = logging.getLogger("chute")

SUBMIT_WAIT = 30.0  # seconds `chute submit` without --wait waits for the daemon to take a file
FOLLOW_POLL = 0.1  # seconds between looks at a followed run's run.json


def cmd_submit(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    topo = common.topology(config)
    loaded: list[tuple[Path, bytes, Pipeline]] = []
    problems: list[str] = []
    for name in args.files:
        try:
            pipeline, raw = common.load(name, config, topo)
        except UsageError as exc:
            problems.append(str(exc))
            continue
        loaded.append((Path(name), raw, pipeline))
    if problems:
        raise UsageError("\n".join([*problems, "nothing submitted: fix the files above first"]))
    try:
        pid = daemon_pid(spool)
    except UsageError as exc:  # a drop box needs no more than write access: submit anyway
        log.warning("%s; cannot tell whether a daemon runs", exc)
        pid = -1
    if pid is None and args.wait:
        raise UsageError(f"no chute daemon runs on {spool.root}; start one, or use chute run")
    placed: list[submission.Placed] = []
    report: list[dict[str, Any]] = []  # --json: one entry per file
    say = _quiet if args.json else print
    try:
        for path, raw, pipeline in loaded:
            schedule = pipeline.name if pipeline.schedule is not None else None
            placed.append(submission.place(spool, path, raw, schedule=schedule))
            say(f"submitted {path} as incoming/{placed[-1].name}")
            report.append({"file": str(path), "incoming": placed[-1].name})
        if pid is None or (pid == -1 and not args.wait):
            if pid is None:
                files = "the file waits" if len(placed) == 1 else "the files wait"
                say(f"no chute daemon runs on {spool.root}: {files} in incoming/ until one starts")
            if args.json:
                common.print_json(
                    [{**r, **_outcome(submission.Verdict("waiting"))} for r in report]
                )
            return EXIT_OK
        deadline = None if args.wait else time.monotonic() + SUBMIT_WAIT
        code = EXIT_OK
        for one, entry in zip(placed, report, strict=True):
            verdict = submission.verdict(spool, one, deadline=deadline)
            one.close()
            told = _tell(one, verdict, say)
            entry.update(_outcome(verdict))
            if args.wait:
                entry.update(state=None, exit_code=told)
            if args.wait and verdict.kind == "run":
                told = max(told, follow_run(spool, verdict.detail, quiet=args.json))
                final = rundir.read_json(spool.runs / verdict.detail / "run.json")["state"]
                entry.update(state=final, exit_code=told)
            code = max(code, told)
        if args.json:
            common.print_json(report)
        return code
    finally:
        for one in placed:
            one.close()


def _quiet(*args: object) -> None:
    """`print` for a command that prints one JSON document instead."""


def _outcome(verdict: submission.Verdict) -> dict[str, Any]:
    """What `submit --json` says of a file the daemon has judged (or not yet)."""
    return {
        "outcome": verdict.kind,
        "run_id": verdict.detail if verdict.kind == "run" else None,
        "schedule": verdict.detail if verdict.kind == "schedule" else None,
        "error": verdict.detail if verdict.kind in ("rejected", "unreadable") else None,
    }


def _tell(
    placed: submission.Placed, verdict: submission.Verdict, say: Callable[..., None] = print
) -> int:
    """Print what the daemon made of a submitted file (by `say`; stderr always); the exit
    code it means."""
    where = f"incoming/{placed.name}"
    if verdict.kind == "run":
        say(f"{where} accepted as run {verdict.detail}")
    elif verdict.kind == "schedule":
        say(f"{where} scheduled as {verdict.detail}")
    elif verdict.kind == "waiting":
        say(
            f"{where} not taken by the daemon within {SUBMIT_WAIT:.0f}s: it waits there, and "
            "`chute runs` lists its run once taken"
        )
    elif verdict.kind == "unreadable":
        say(f"{where}: its run id cannot be learned: {verdict.detail}: not readable by you")
    elif verdict.kind == "rejected":
        print(f"{where} rejected: {verdict.detail}", file=sys.stderr)
        return EXIT_FAILED
    else:
        print(
            f"{where} was removed before the daemon took it: no run, schedule or rejection "
            "carries it",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def follow_run(
    spool: Spool, run_id: str, cancel: Callable[[], bool] | None = None, *, quiet: bool = False
) -> int:
    """Follow a run the daemon drives: live progress on a terminal, the summary at the end
    (neither when `quiet`). Once `cancel` says so, ask the daemon to cancel it (and follow
    it to its end)."""
    folder = spool.runs / run_id
    tty = sys.stdout.isatty() and not quiet
    last = ""
    cancelling = False
    while True:
        if cancel is not None and not cancelling and cancel():
            cancelling = True
            control.submit(spool, control.Cancel(run_id))
            print(f"{run_id}: cancelling", file=sys.stderr)
        rec = rundir.read_json(folder / "run.json")
        if tty:
            try:
                stages = rundir.read_json(folder / "manifest.json")["stages"]
            except (OSError, orjson.JSONDecodeError, KeyError):
                stages = []
            done = sum(1 for x in stages if x["state"] in STAGE_OK)
            running = sum(1 for x in stages if x["state"] == "running")
            failed = sum(1 for x in stages if x["state"] in ("failed", "timed_out"))
            line = (
                f"{rec['pipeline']} {run_id}: {rec['state']}, {done} done, "
                f"{running} running, {failed} failed"
            )
            if line != last:
                sys.stdout.write("\r" + line.ljust(len(last)))
                sys.stdout.flush()
                last = line
        if rec["state"] in rundir.FINAL_RUN_STATES:
            break
        time.sleep(FOLLOW_POLL)
    if tty:
        sys.stdout.write("\n")
    if not quiet:
        print(summary(folder))
    return EXIT_OK if rec["state"] == "succeeded" else EXIT_FAILED


class _StopFollowing(Exception):
    """A second Ctrl-C while `chute run` follows a run it asked the daemon to cancel."""


def hand_over(spool: Spool, source: Path, raw: bytes) -> int:
    """`chute run` beside a daemon: submit the file and follow its run, like `chute submit
    --wait`; the first Ctrl-C or SIGTERM cancels the run (a second stops following it)."""
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            raise _StopFollowing

    placed = submission.place(spool, source, raw, schedule=None)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    run_id: str | None = None
    try:
        print(f"submitted {source} as incoming/{placed.name}")
        verdict = submission.verdict(spool, placed, deadline=None)
        placed.close()
        code = _tell(placed, verdict)
        if verdict.kind != "run":
            return code
        run_id = verdict.detail
        return follow_run(spool, run_id, cancel=lambda: signals > 0)
    except _StopFollowing:
        if run_id is None:
            print(
                f"stopped waiting: incoming/{placed.name} is still submitted (`chute runs` "
                "lists its run once the daemon takes it; `chute cancel` it then)",
                file=sys.stderr,
            )
        else:
            print(f"stopped following {run_id}; its cancel is requested", file=sys.stderr)
        return EXIT_FAILED
    finally:
        placed.close()
        for s, h in old.items():
            signal.signal(s, h)
