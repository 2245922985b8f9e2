"""One run in this process: `chute run` and `chute retry`, and the live progress line.

Owns: running one run to its end here (an engine, an executor and a reactor of its own,
Ctrl-C or SIGTERM cancels), the cores `chute run --here` may use beside a daemon, and
what `run` and `retry` do when a daemon runs on the spool (hand the file to it, or ask it
for the retry). Not here: making the run (chute.engine.runs), who owns its tasks
(chute.execution.owners), handing a file over and following a run the daemon drives
(chute.cli.submit).
Crash safety: this process owns its run by a lock held from before the run folder exists
until its processes are gone (chute.execution.owners), so after a kill -9 the next daemon
start or `chute gc` ends what it left and marks the run interrupted.
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

from chute import names
from chute.cli import common
from chute.cli.common import EXIT_FAILED, EXIT_OK, UsageError
from chute.cli.daemon import POLL, daemon_pid, read_status, status_path, wait_for
from chute.cli.show import summary
from chute.cli.submit import follow_run, hand_over
from chute.clock import Clock
from chute.config import Config
from chute.engine import retry, runs
from chute.engine.loop import Engine
from chute.engine.runs import ActiveRun
from chute.engine.stage import STAGE_OK
from chute.execution import owners
from chute.execution.executor import Result
from chute.execution.local import LocalExecutor
from chute.intake import control
from chute.observe import report
from chute.reactor import Reactor
from chute.scheduling.topology import Topology, format_cpulist, parse_cpulist, read_topology
from chute.store import queue, rundir
from chute.store.spool import Spool, sync_roots

log = logging.getLogger("chute")

PROGRESS_EVERY = 0.1  # seconds between redraws of the progress line
STATUS_WAIT = 5.0  # seconds `--here` waits for a daemon just started to write status.json
RETRY_WAIT = 60.0  # seconds `retry` waits for the daemon to make the new run


class Progress:
    """A live status line on a terminal; nothing otherwise (the log lines tell the story)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    def update(self, run: ActiveRun, force: bool = False) -> None:
        if not self.enabled:
            return
        mono = time.monotonic()
        if not force and mono - self._last < PROGRESS_EVERY:
            return
        self._last = mono
        counts = run.graph.counts()
        done = sum(counts.get(k, 0) for k in STAGE_OK)
        failed = sum(counts.get(k, 0) for k in ("failed", "timed_out"))
        line = (
            f"{run.pipeline.name} {run.run_id}: {done}/{len(run.graph.stages)} done, "
            f"{counts.get('running', 0)} running, {counts.get('waiting', 0)} waiting, "
            f"{failed} failed"
        )
        pad = max(0, self._width - len(line))
        self._width = len(line)
        sys.stdout.write("\r" + line + " " * pad)
        sys.stdout.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _foreground(
    spool: Spool, config: Config, topo: Topology, make: Callable[[str], ActiveRun]
) -> int:
    """Run one run to its end in this process; Ctrl-C or SIGTERM cancels it.

    `make(run_id)` makes the run. This process owns it (chute.execution.owners): its lock is held
    from before the run folder exists until the run's processes are gone, so a daemon
    starting on the spool leaves its tasks alone, and after a kill -9 of this process
    the next daemon start or `chute gc` ends them and marks the run interrupted."""
    spool.ensure()
    stop = False
    reactor = Reactor()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True
        reactor.wake()

    def deliver(result: Result) -> None:
        engine.deliver(result)

    run_id = rundir.new_run_id(Clock().now())
    owner = owners.start_foreground(spool, run_id)
    try:
        executor = LocalExecutor(
            reactor=reactor,
            on_result=deliver,
            kill_grace=config.kill_grace,
            log_limit=config.log_limit,
            max_workers=len(topo.cpus),
            owner=owner,
        )
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        progress = Progress(sys.stdout.isatty())
        try:
            engine = Engine(
                spool=spool,
                executor=executor,
                topology=topo,
                policy=config.policy,
                syncfs=sync_roots(config, spool),
                wake=reactor.wake,
            )
            run = make(run_id)
            engine.add(run)
            log.info("%s run started pipeline=%s", run.run_id, run.pipeline.name)

            def should_stop() -> bool:
                progress.update(run)
                return stop

            engine.run_until_done(reactor.wait, should_stop)
            progress.update(run, force=True)
        finally:
            progress.close()
            executor.close()
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        owner.release()
        reactor.close()
    report.write_report_or_log(run.dir)  # never changes the exit code
    print(summary(run.dir))
    return EXIT_OK if run.record["state"] == "succeeded" else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    """Beside a daemon on the spool, the daemon runs the file (its cores are its own: a second
    allocator in this process could not know what the daemon gives out next) and this
    process follows it; `--here` runs it in this process on cores the daemon does not use."""
    config = common.config(args)
    spool = common.spool(args, config)
    topo = common.topology(config)
    pid = daemon_pid(spool)
    if pid is not None and args.here:
        topo = _cores_left(spool, config, topo, pid)
    pipeline, raw = common.load(args.file, config, topo)
    if pid is not None and not args.here:
        if pipeline.schedule is not None:
            raise UsageError(
                f"{args.file}: has a schedule, and a chute daemon (pid {pid}) runs on "
                f"{spool.root}: handed to it, the file would be scheduled; use `chute submit` "
                "to schedule it, or `chute run --here` to run it once now in this process"
            )
        print(
            f"a chute daemon (pid {pid}) runs on {spool.root}: it runs {args.file} on its cores "
            "and this command follows the run (--here runs it in this process instead)"
        )
        return hand_over(spool, Path(args.file), raw)
    if pipeline.schedule is not None:
        log.warning(
            "%s: has a schedule; `chute run` runs it once now (the daemon would schedule it)",
            args.file,
        )
    clock = Clock()

    def make(run_id: str) -> ActiveRun:
        new = runs.new_run(
            pipeline,
            raw,
            trigger={"type": "run", "source": str(Path(args.file).absolute())},
            now=clock.now(),
            run_id=run_id,
        )
        return runs.make_run(spool, new)

    return _foreground(spool, config, topo, make)


def _cores_left(spool: Spool, config: Config, topo: Topology, pid: int) -> Topology:
    """`topo` less the cores of the daemon `pid` (as its state/status.json lists them), for
    `chute run --here`; UsageError when none is left."""
    theirs: set[int] | None = None
    deadline = time.monotonic() + STATUS_WAIT  # a daemon just started writes it within a second
    while theirs is None:
        status = read_status(spool)
        if status is not None and status.get("pid") == pid:
            try:
                theirs = {c for node in status["cpus"] for c in parse_cpulist(node["cores"])}
            except (ValueError, KeyError, TypeError):
                pass
        if theirs is None:
            if time.monotonic() > deadline:
                raise UsageError(
                    f"cannot tell which cores the chute daemon (pid {pid}) uses: "
                    f"{status_path(spool)} does not say; run without --here to hand "
                    "the run to it"
                )
            time.sleep(POLL)
    left = sorted(set(topo.cpus) - theirs)
    if not left:
        raise UsageError(
            f"--here: every core chute may use here ({format_cpulist(topo.cpus)}) is the "
            f"daemon's (pid {pid}); run without --here to hand the run to the daemon, or leave "
            "cores out of its cpus: (or reserve_cpus) in its config"
        )
    log.info("--here: running on cores %s, which the daemon does not use", format_cpulist(left))
    try:
        return read_topology(cpus=format_cpulist(left), memory=config.memory)
    except ValueError as exc:
        raise UsageError(f"config: {exc}") from None


def _retry_made(spool: Spool, request: Path, new_id: str) -> bool:
    """Whether the daemon has made the run `request` asks for: its queue file is written, or
    the request is gone without a rejection (the daemon removes a request once its effect
    is durable)."""
    if queue.exists(spool, new_id):
        return True
    return not request.exists() and not (spool.rejected / request.name).exists()


def cmd_retry(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    topo = common.topology(config)
    old_dir = common.find_run(spool, args.run)
    if args.from_stage is not None:
        common.checked_name(names.name, args.from_stage, "stage name")
    try:
        plan = retry.plan_retry(
            old_dir, args.from_stage, node_cpus=len(topo.cpus), node_memory=topo.memory
        )
    except retry.RetryRefused as exc:
        raise UsageError(str(exc)) from None
    if daemon_pid(spool) is not None:
        new_id = rundir.new_run_id(Clock().now())
        request = control.submit(spool, control.Retry(plan.old_id, args.from_stage, new_id))
        # The id is printed only once the run is made durably (its queue file, or the
        # request done): a request in control/ is carried out after a crash, but the daemon
        # may still refuse it, and an id printed must become a run.
        if not wait_for(spool, request, lambda: _retry_made(spool, request, new_id), RETRY_WAIT):
            print(
                f"retry of {plan.old_id} requested as {new_id}, but the daemon has not made "
                f"the run within {RETRY_WAIT:.0f}s; {request} stays until it does, or refuses "
                "it (see the daemon's log)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        print(f"retry of {plan.old_id} submitted as {new_id}")
        if not args.wait:
            return EXIT_OK
        return follow_run(spool, new_id)
    clock = Clock()

    def make(run_id: str) -> ActiveRun:
        run = retry.make_retry(spool, plan, now=clock.now(), new_id=run_id)
        assert run is not None  # a new run id: nothing made before
        log.info(
            "%s retry of %s keeps %d stage(s): %s",
            run.run_id,
            plan.old_id,
            len(plan.reused),
            ", ".join(plan.reused) or "none",
        )
        return run

    return _foreground(spool, config, topo, make)
