"""The `chute` command: one subcommand per verb, exit codes 0 ok, 1 failed, 2 usage or input.

Owns: argument parsing, what each command prints, and exit codes. Not here: what the
commands do (chute.engine, chute.store.rundir, chute.spec, chute.intake.submission).
Diagnostics: user mistakes print one line per problem to stderr and exit 2; a failed run
exits 1; a chute bug prints a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from chute import names
from chute.clock import Clock
from chute.config import Config, ConfigError, load_config
from chute.engine import reasons, runs
from chute.engine.dag import STAGE_OK
from chute.engine.loop import ActiveRun, Engine
from chute.execution import owners
from chute.execution.executor import Result
from chute.execution.local import LocalExecutor
from chute.intake import control, submission
from chute.observe import logs, report
from chute.reactor import Reactor
from chute.scheduling.topology import Topology, format_cpulist, parse_cpulist, read_topology
from chute.spec import SpecError, json_schema, load_bytes, load_file
from chute.spec.model import Pipeline
from chute.store import retention, rundir, taskfiles
from chute.store.spool import Spool, resolve_spool, sync_roots
from chute.units import format_duration, format_size

log = logging.getLogger("chute")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NOT_RUNNING = 3  # `chute status` with no daemon: the LSB and `systemctl status` code
SPEC_LIMIT = 64 << 20  # bytes of a run's spec.yaml read back (intake took max_file_size)


class UsageError(Exception):
    """A mistake of the caller: printed as one line per problem, exit 2."""


# -- shared plumbing -------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _spool(args: argparse.Namespace, config: Config) -> Spool:
    return resolve_spool(args.spool, config)


def _topology(config: Config) -> Topology:
    try:
        return read_topology(
            cpus=config.cpus, reserve_cpus=config.reserve_cpus, memory=config.memory
        )
    except ValueError as exc:
        raise UsageError(f"config: {exc}") from None


def _load(path: str, config: Config, topo: Topology) -> tuple[Pipeline, bytes]:
    try:
        return load_file(
            path,
            max_file_size=config.max_file_size,
            node_cpus=len(topo.cpus),
            node_memory=topo.memory,
        )
    except SpecError as exc:
        raise UsageError("\n".join(str(i) for i in exc.issues)) from None


def _find(spool: Spool, ref: str) -> Path:
    try:
        return rundir.find_run(spool, ref)  # checks the ref's form first (chute.names)
    except rundir.UnknownRun as exc:
        raise UsageError(str(exc)) from None


def _checked(check: Callable[[str, str], str], text: str, what: str) -> str:
    """A name from the command line, checked against the form of its kind (chute.names)."""
    try:
        return check(text, what)
    except names.BadName as exc:
        raise UsageError(str(exc)) from None


# -- validate --------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    config = _config(args)
    topo = _topology(config)
    status = EXIT_OK
    for path in args.files:
        try:
            pipeline, _ = _load(path, config, topo)
        except UsageError as exc:
            print(exc, file=sys.stderr)
            status = EXIT_USAGE
            continue
        print(f"{path}: ok: {pipeline.kind} {pipeline.name}, {_plan(pipeline)}")
    return status


def _plan(p: Pipeline) -> str:
    """The stage plan: stages in topological order with what each waits for."""
    when = "runs now" if p.schedule is None else f"scheduled ({_trigger_text(p)})"
    lines = [f"{len(p.stages)} stage{'s' if len(p.stages) != 1 else ''}, {when}"]
    for s in p.stages:
        what = f"run: {_command_text(s.run)}" if s.run is not None else f"call: {s.call}"
        extra = [f"cpus={s.cpus}"]
        if s.shards is not None:
            extra.append(f"shards={s.shards.count}")
        if s.depends_on:
            extra.append(f"after {', '.join(s.depends_on)}")
        lines.append(f"  {s.name}: {what} ({', '.join(extra)})")
    return "\n".join(lines)


def _command_text(command: str | tuple[str, ...], width: int = 60) -> str:
    """One line for a command: argv as a shell would write it, a script's first line and
    how many follow, cut at `width` with an ellipsis."""
    if isinstance(command, tuple):
        text, more = shlex.join(command), ""
    else:
        lines = command.strip().splitlines() or [""]
        text = lines[0]
        more = f"  (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
    room = width - len(more)
    return (text if len(text) <= room else text[: room - 1] + "…") + more


def _trigger_text(p: Pipeline) -> str:
    from chute.scheduling.schedules import trigger_text

    assert p.schedule is not None
    return trigger_text(p.schedule)


# -- run, retry: one run in the foreground ---------------------------------------------------


class Progress:
    """A live status line on a terminal; nothing otherwise (the log lines tell the story)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    def update(self, run: ActiveRun, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        counts = run.graph.counts()
        done = sum(counts.get(k, 0) for k in ("succeeded", "cached", "fallback"))
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
    config = _config(args)
    spool = _spool(args, config)
    topo = _topology(config)
    pid = _daemon_pid(spool)
    if pid is not None and args.here:
        topo = _cores_left(spool, config, topo, pid)
    pipeline, raw = _load(args.file, config, topo)
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
        return _hand_over(spool, Path(args.file), raw)
    if pipeline.schedule is not None:
        log.warning(
            "%s: has a schedule; `chute run` runs it once now (the daemon would schedule it)",
            args.file,
        )
    clock = Clock()

    def make(run_id: str) -> ActiveRun:
        return runs.create_run(
            spool,
            pipeline,
            raw,
            trigger={"type": "run", "source": str(Path(args.file).absolute())},
            now=clock.now(),
            run_id=run_id,
        )

    return _foreground(spool, config, topo, make)


def _cores_left(spool: Spool, config: Config, topo: Topology, pid: int) -> Topology:
    """`topo` less the cores of the daemon `pid` (as its state/status.json lists them), for
    `chute run --here`; UsageError when none is left."""
    theirs: set[int] | None = None
    deadline = time.monotonic() + 5  # a daemon just started writes it within a second
    while theirs is None:
        try:
            status = rundir.read_json(spool.state / "status.json")
            if status.get("pid") == pid:
                theirs = {c for node in status["cpus"] for c in parse_cpulist(node["cores"])}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if theirs is None:
            if time.monotonic() > deadline:
                raise UsageError(
                    f"cannot tell which cores the chute daemon (pid {pid}) uses: "
                    f"{spool.state / 'status.json'} does not say; run without --here to hand "
                    "the run to it"
                )
            time.sleep(0.05)
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


def _hand_over(spool: Spool, source: Path, raw: bytes) -> int:
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
        status = _tell(placed, verdict)
        if verdict.kind != "run":
            return status
        run_id = verdict.detail
        return _follow_run(spool, run_id, cancel=lambda: signals > 0)
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


class _StopFollowing(Exception):
    """A second Ctrl-C while `chute run` follows a run it asked the daemon to cancel."""


def cmd_retry(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    topo = _topology(config)
    old_dir = _find(spool, args.run)
    if args.from_stage is not None:
        _checked(names.name, args.from_stage, "stage name")
    try:
        plan = runs.plan_retry(
            old_dir, args.from_stage, node_cpus=len(topo.cpus), node_memory=topo.memory
        )
    except runs.RetryRefused as exc:
        raise UsageError(str(exc)) from None
    if _daemon_pid(spool) is not None:
        new_id = rundir.new_run_id(Clock().now())
        request = _control(spool, control.Retry(plan.old_id, args.from_stage, new_id))
        if not _retry_made(spool, request, new_id):
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
        return _follow_run(spool, new_id)
    clock = Clock()

    def make(run_id: str) -> ActiveRun:
        run = runs.make_retry(spool, plan, now=clock.now(), new_id=run_id)
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


# -- show, logs ------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _attempts(entry: dict[str, Any]) -> int:
    """Attempts a manifest entry made: the manifest lists only the first and last few."""
    return int(entry.get("attempts_total", len(entry["attempts"])))


def summary(run_dir: Path, status: dict[str, Any] | None = None) -> str:
    """The execution summary of a run: one row per stage (and shard), then the tally. A run
    not started yet (no manifest) lists its stages from spec.yaml. With the daemon's
    `status` (state/status.json), a run not finished also says what it and each of its
    stages wait for."""
    rec = rundir.read_json(run_dir / "run.json")
    try:
        stages: list[dict[str, Any]] = rundir.read_json(run_dir / "manifest.json")["stages"]
        planned = False
    except FileNotFoundError:
        stages, planned = _planned(run_dir), True
    head = (
        f"run {rec['run_id']}  pipeline {rec['pipeline']}  state {rec['state']}"
        f"  trigger {rec['trigger'].get('type')}"
    )
    if rec.get("resumed_from"):
        head += f"  resumed_from {rec['resumed_from']}"
    lines = [head]
    waits: dict[str, str] | None = None
    if rec["state"] in ("queued", "running"):
        waits, why, ready = _waits(rec, stages, status)
        if why:
            lines.append(why)
        for s in stages if planned else ():
            if s["name"] in ready:
                s["state"] = "waiting"  # as the engine has it: ready, not started
    rows: list[list[str]] = [["STAGE", "STATE", "ATTEMPTS", "DURATION", "CORES"]]
    if waits is not None:
        rows[0].append("WAITING FOR")

    def dur(v: float | None) -> str:
        return "-" if v is None else format_duration(v)

    for s in stages:
        rows.append(
            [
                s["name"],
                s["state"],
                str(_attempts(s)) if not s["shards"] else "-",
                dur(s["duration_seconds"]),
                format_cpulist(s["cores"]) if s["cores"] else "-",
            ]
        )
        if waits is not None:
            rows[-1].append(waits.get(s["name"], "-"))
        for sh in s["shards"]:
            rows.append(
                [
                    f"  [{sh['index']}]",
                    sh["state"],
                    str(_attempts(sh)),
                    dur(sh["duration_seconds"]),
                    format_cpulist(sh["cores"]) if sh["cores"] else "-",
                ]
            )
            if waits is not None:
                rows[-1].append("")
    counts: dict[str, int] = {}
    for s in stages:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    # Not a row: a stage may be named `total`.
    lines += [
        *_table(rows),
        f"stages: {tally or 'none'}; run took {dur(rec.get('duration_seconds'))}",
    ]
    if rec.get("error"):
        lines.append(f"error: {rec['error']}")
    lines.append(f"folder: {run_dir}")
    return "\n".join(lines)


def _planned(run_dir: Path) -> list[dict[str, Any]]:
    """Manifest entries, all pending, for a run whose manifest is not written yet: its
    stages as its spec.yaml lists them (none when that cannot be read)."""
    try:
        data = taskfiles.read_regular(str(run_dir / "spec.yaml"), SPEC_LIMIT)
        pipeline = load_bytes(data, str(run_dir / "spec.yaml"))
    except (OSError, SpecError):
        return []
    return [
        {
            "name": s.name,
            "state": "pending",
            "dependsOn": list(s.depends_on),
            "cores": [],
            "duration_seconds": None,
            "attempts": [],
            "shards": [],
        }
        for s in pipeline.stages
    ]


def _waits(
    rec: dict[str, Any], stages: list[dict[str, Any]], status: dict[str, Any] | None
) -> tuple[dict[str, str], str | None, set[str]]:
    """What each stage of an unfinished run waits for (stage name -> text), a line for the
    run as a whole (None: nothing to say), and the stages ready and waiting to start."""
    entry = None
    if status is not None:
        entry = next(
            (w for w in status.get("waiting", []) if w.get("run_id") == rec["run_id"]), None
        )
    out: dict[str, str] = {}
    ready: set[str] = set()
    if entry is not None:
        for w in entry["stages"]:
            out.setdefault(w["stage"], reasons.describe(w, status or {}))
            if w["for"] != reasons.RETRY:
                ready.add(w["stage"])
    done = {s["name"] for s in stages if s["state"] in STAGE_OK}
    for s in stages:
        blocked = [d for d in s.get("dependsOn", []) if d not in done]
        if s["name"] not in out and s["state"] in ("pending", "waiting") and blocked:
            out[s["name"]] = f"{reasons.DEPENDENCY}: {', '.join(blocked)}"
    if status is None:
        queued = rec["state"] == "queued"
        return out, "waiting: no daemon runs on this spool" if queued else None, ready
    if entry is None:
        if status.get("waiting_runs", 0) > len(status.get("waiting", [])):
            line = f"waiting: behind the first {len(status['waiting'])} runs in the queue"
            return out, line, ready
        return out, None, ready
    where = f", #{entry['position']} in the queue" if entry.get("position") else ""
    return out, f"waiting for {entry['for']} since {entry['since']}{where}", ready


def cmd_show(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    run_dir = _find(spool, args.run)
    if args.json:
        status = _status(spool) or {}
        entry = next(
            (w for w in status.get("waiting", []) if w.get("run_id") == run_dir.name), None
        )
        doc = {
            "run": rundir.read_json(run_dir / "run.json"),
            "manifest": rundir.read_json(run_dir / "manifest.json")
            if (run_dir / "manifest.json").exists()
            else None,
            "waiting": None
            if entry is None
            else {k: entry[k] for k in ("for", "since", "position")},
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(summary(run_dir, _status(spool)))
        timeline = report.text_timeline(run_dir)
        if timeline:
            print(timeline)
        if (run_dir / report.REPORT_NAME).exists():
            print(f"report: {run_dir / report.REPORT_NAME}")
    return EXIT_OK


SHARD_REF = re.compile(r"(.+)\[(\d+)\]")  # `measure[1]`, as log headers name a shard


def _log_files(run_dir: Path, stage: str | None) -> list[tuple[str, Path]]:
    stages_dir = run_dir / "stages"
    shard = SHARD_REF.fullmatch(stage) if stage is not None else None
    if stage is not None and shard is not None and not (stages_dir / stage).is_dir():
        name, index = shard.group(1), int(shard.group(2))
        log_path = stages_dir / name / str(index) / "log"
        if not log_path.is_file():
            raise UsageError(f"{stage}: no log of shard {index} of stage {name} in {run_dir.name}")
        return [(f"{name}[{index}]", log_path)]
    if stage is not None:
        _checked(names.name, stage, "stage name")
        if not (stages_dir / stage).is_dir():
            spec_names: list[str] = []
            try:
                manifest = rundir.read_json(run_dir / "manifest.json")
                spec_names = [s["name"] for s in manifest["stages"]]
            except FileNotFoundError:
                pass
            known = ", ".join(spec_names) or "none ran yet"
            raise UsageError(f"{stage}: no such stage in {run_dir.name} (stages: {known})")
        stage_names = [stage]
    else:
        stage_names = (
            sorted(p.name for p in stages_dir.iterdir() if not p.name.startswith("."))
            if stages_dir.is_dir()
            else []
        )
    out: list[tuple[str, Path]] = []
    for name in stage_names:
        folder = stages_dir / name
        if (folder / "log").exists():
            out.append((name, folder / "log"))
        shards = sorted(
            (p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        out.extend((f"{name}[{p.name}]", p / "log") for p in shards if (p / "log").exists())
    return out


def cmd_logs(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    run_dir = _find(spool, args.run)
    files = _log_files(run_dir, args.stage)
    if not args.follow:
        for name, path in files:
            if len(files) > 1 or args.stage is None:
                print(f"==> {name} <==")
            sys.stdout.write(path.read_text(errors="replace"))
        return EXIT_OK
    return _follow(run_dir, args.stage)


def _follow(run_dir: Path, stage: str | None) -> int:
    """Print logs as they grow until the run has ended."""
    offsets: dict[Path, int] = {}
    while True:
        final = rundir.read_json(run_dir / "run.json")["state"] in rundir.FINAL_RUN_STATES
        for name, path in _log_files(run_dir, stage):
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                chunk = f.read()
                offsets[path] = f.tell()
            if chunk:
                for line in chunk.decode(errors="replace").splitlines():
                    print(f"{name}: {line}")
                sys.stdout.flush()
        if final:
            return EXIT_OK
        time.sleep(0.2)


# -- daemon and the commands that talk to it ------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from chute.daemon import Daemon, SpoolLocked

    config = _config(args)
    spool = _spool(args, config)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logs.setup(level, config.log_format)
    try:
        return Daemon(spool, config, args.config).run()
    except SpoolLocked as exc:
        raise UsageError(str(exc)) from None


def _daemon_pid(spool: Spool) -> int | None:
    from chute.daemon import daemon_pid

    try:
        return daemon_pid(spool)
    except PermissionError as exc:
        raise UsageError(_unreadable(spool, exc)) from None


def _unreadable(spool: Spool, exc: OSError) -> str:
    return (
        f"cannot read {exc.filename or spool.state}: {exc.strerror}; this command reads the "
        f"daemon's {spool.state}/ (under systemd, members of chute-submit may: see "
        "systemd/README.md)"
    )


def _control(spool: Spool, request: control.Request) -> Path:
    return control.submit(spool, request)


RETRY_WAIT = 60.0  # seconds `chute retry` waits for the daemon to make the retry's run


def _retry_made(spool: Spool, request: Path, new_id: str) -> bool:
    """Wait until the daemon has made the run `request` asks for durably (its queue file
    written, or the request done); UsageError with the daemon's reason when it refused the
    request (the run to retry was removed meanwhile); False after RETRY_WAIT.

    The run id is printed only then: a request in control/ is carried out after a crash, but
    the daemon may still refuse it, and an id printed must become a run."""
    deadline = time.monotonic() + RETRY_WAIT
    while time.monotonic() < deadline:
        if (spool.queue / f"{new_id}.yaml").exists():
            return True
        if not request.exists():
            _raise_if_rejected(spool, request)
            if not (spool.rejected / request.name).exists():
                return True  # done: the daemon removes a request once its effect is durable
        time.sleep(0.05)
    return False


def _raise_if_rejected(spool: Spool, request: Path) -> None:
    """UsageError with the daemon's reason once it has moved `request` to rejected/."""
    report = spool.rejected / f"{request.name}.error.json"
    if request.exists() or not report.exists():
        return
    try:
        doc = rundir.read_json(report)
        messages = "; ".join(str(e.get("message")) for e in doc.get("errors", []))
    except (OSError, ValueError, AttributeError):
        messages = "see the daemon's log"
    raise UsageError(f"the daemon refused the request: {messages} ({report})")


SUBMIT_WAIT = 30.0  # seconds `chute submit` without --wait waits for the daemon to take a file


def cmd_submit(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    topo = _topology(config)
    loaded: list[tuple[Path, bytes, Pipeline]] = []
    problems: list[str] = []
    for name in args.files:
        try:
            pipeline, raw = _load(name, config, topo)
        except UsageError as exc:
            problems.append(str(exc))
            continue
        loaded.append((Path(name), raw, pipeline))
    if problems:
        raise UsageError("\n".join([*problems, "nothing submitted: fix the files above first"]))
    try:
        pid = _daemon_pid(spool)
    except UsageError as exc:  # a drop box needs no more than write access: submit anyway
        log.warning("%s; cannot tell whether a daemon runs", exc)
        pid = -1
    if pid is None and args.wait:
        raise UsageError(f"no chute daemon runs on {spool.root}; start one, or use chute run")
    placed: list[submission.Placed] = []
    try:
        for path, raw, pipeline in loaded:
            schedule = pipeline.name if pipeline.schedule is not None else None
            placed.append(submission.place(spool, path, raw, schedule=schedule))
            print(f"submitted {path} as incoming/{placed[-1].name}")
        if pid is None:
            files = "the file waits" if len(placed) == 1 else "the files wait"
            print(f"no chute daemon runs on {spool.root}: {files} in incoming/ until one starts")
            return EXIT_OK
        if pid == -1 and not args.wait:
            return EXIT_OK
        deadline = None if args.wait else time.monotonic() + SUBMIT_WAIT
        status = EXIT_OK
        for one in placed:
            verdict = submission.verdict(spool, one, deadline=deadline)
            one.close()
            status = max(status, _tell(one, verdict))
            if args.wait and verdict.kind == "run":
                status = max(status, _follow_run(spool, verdict.detail))
        return status
    finally:
        for one in placed:
            one.close()


def _tell(placed: submission.Placed, verdict: submission.Verdict) -> int:
    """Print what the daemon made of a submitted file; the exit code it means."""
    where = f"incoming/{placed.name}"
    if verdict.kind == "run":
        print(f"{where} accepted as run {verdict.detail}")
    elif verdict.kind == "schedule":
        print(f"{where} scheduled as {verdict.detail}")
    elif verdict.kind == "waiting":
        print(
            f"{where} not taken by the daemon within {SUBMIT_WAIT:.0f}s: it waits there, and "
            "`chute runs` lists its run once taken"
        )
    elif verdict.kind == "unreadable":
        print(f"{where}: its run id cannot be learned: {verdict.detail}: not readable by you")
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


def _follow_run(spool: Spool, run_id: str, cancel: Callable[[], bool] | None = None) -> int:
    """Follow a run the daemon drives: live progress on a terminal, the summary at the end.
    Once `cancel` says so, ask the daemon to cancel it (and follow it to its end)."""
    folder = spool.runs / run_id
    tty = sys.stdout.isatty()
    last = ""
    cancelling = False
    while True:
        if cancel is not None and not cancelling and cancel():
            cancelling = True
            _control(spool, control.Cancel(run_id))
            print(f"{run_id}: cancelling", file=sys.stderr)
        rec = rundir.read_json(folder / "run.json")
        if tty:
            try:
                stages = rundir.read_json(folder / "manifest.json")["stages"]
            except (OSError, orjson.JSONDecodeError, KeyError):
                stages = []
            done = sum(1 for x in stages if x["state"] in ("succeeded", "cached", "fallback"))
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
        time.sleep(0.1)
    if tty:
        sys.stdout.write("\n")
    print(summary(folder))
    return EXIT_OK if rec["state"] == "succeeded" else EXIT_FAILED


def _status(spool: Spool) -> dict[str, Any] | None:
    """state/status.json of the daemon running on `spool`; None without one (or before it
    wrote one)."""
    if _daemon_pid(spool) is None:
        return None
    try:
        doc = rundir.read_json(spool.state / "status.json")
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    pid = _daemon_pid(spool)
    if pid is None:
        print(f"chute daemon is not running on {spool.root}")
        return EXIT_NOT_RUNNING
    try:
        st = rundir.read_json(spool.state / "status.json")
    except (OSError, orjson.JSONDecodeError):
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
    for path in sorted(spool.queue.glob("*.yaml"))[:50]:
        try:
            rec = rundir.read_json(spool.runs / path.stem / "run.json")
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
        print("\n".join(_table(rows)))
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    rows = [["RUN", "PIPELINE", "STATE", "TRIGGER", "CREATED", "DURATION"]]
    for run_id in reversed(rundir.run_ids(spool)):
        if len(rows) > args.limit:
            break
        try:
            rec = rundir.read_json(spool.runs / run_id / "run.json")
        except (OSError, orjson.JSONDecodeError):
            continue
        if args.pipeline and rec["pipeline"] != args.pipeline:
            continue
        if args.state and rec["state"] != args.state:
            continue
        dur = rec.get("duration_seconds")
        rows.append(
            [
                run_id,
                rec["pipeline"],
                rec["state"],
                rec["trigger"].get("type", "-"),
                rec["created_at"],
                "-" if dur is None else format_duration(dur),
            ]
        )
    print("\n".join(_table(rows)))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    folder = _find(spool, args.run)
    run_id = folder.name
    rec = rundir.read_json(folder / "run.json")
    if rec["state"] in ("succeeded", "failed", "cancelled"):
        print(f"{run_id} already {rec['state']}")
        return EXIT_OK
    lock = None if _daemon_pid(spool) is not None else _lock_if_free(spool)
    if lock is None:
        request = _control(spool, control.Cancel(run_id))
        deadline = time.monotonic() + config.kill_grace + 30
        while time.monotonic() < deadline:
            rec = rundir.read_json(folder / "run.json")
            if rec["state"] in rundir.FINAL_RUN_STATES:
                print(f"{run_id} {rec['state']}")
                return EXIT_OK
            _raise_if_rejected(spool, request)
            time.sleep(0.05)
        print(f"{run_id}: cancel requested; the daemon has not finished it yet", file=sys.stderr)
        return EXIT_FAILED
    # No daemon, and none starts while we hold its lock: nothing runs; a queued or
    # interrupted run just will not start again.
    try:
        rec = rundir.read_json(folder / "run.json")
        if rec["state"] in ("succeeded", "failed", "cancelled"):
            print(f"{run_id} already {rec['state']}")
            return EXIT_OK
        runs.cancel_stopped(spool, run_id, time.time())
    finally:
        os.close(lock)
    print(f"{run_id} cancelled")
    return EXIT_OK


def _lock_if_free(spool: Spool) -> int | None:
    from chute.daemon import lock_if_free

    return lock_if_free(spool)


def cmd_schedules(args: argparse.Namespace) -> int:
    from chute.scheduling.schedules import Schedules

    config = _config(args)
    spool = _spool(args, config)
    topo = _topology(config)
    rows = [["NAME", "TRIGGER", "NEXT FIRE"]]
    with tempfile.TemporaryDirectory() as tmp:
        state = spool.state / "schedules.json"
        try:
            shutil.copy(state, Path(tmp) / "schedules.json")
        except FileNotFoundError:
            pass
        except PermissionError as exc:
            raise UsageError(_unreadable(spool, exc)) from None
        table = Schedules(Path(tmp))
        now = datetime.now(UTC)
        for path in sorted(spool.schedules.glob("*.yaml")):
            try:
                pipeline, _ = _load(str(path), config, topo)
            except UsageError as exc:
                print(exc, file=sys.stderr)
                continue
            if pipeline.schedule is None:
                continue
            table.set(
                path.stem, pipeline.schedule, datetime.fromtimestamp(path.stat().st_mtime, UTC)
            )
        for name, trigger, nxt in table.listing(now):
            rows.append([name, trigger, nxt or "never"])
    print("\n".join(_table(rows)))
    return EXIT_OK


def cmd_unschedule(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    name = _checked(names.name, args.name, "schedule name")
    path = spool.schedules / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in spool.schedules.glob("*.yaml"))
        raise UsageError(f"{name}: no such schedule (schedules: {', '.join(known) or 'none'})")
    if _daemon_pid(spool) is not None:
        request = _control(spool, control.Unschedule(name))
        deadline = time.monotonic() + 10
        while path.exists():
            _raise_if_rejected(spool, request)
            if time.monotonic() > deadline:
                print(
                    f"{name}: unschedule requested; the daemon has not done it yet",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            time.sleep(0.05)
    else:
        control.unschedule_file(spool, name)
    print(f"unscheduled {name}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    config = _config(args)
    spool = _spool(args, config)
    for run_id in owners.end_dead_foreground(spool, config.kill_grace):
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


# -- schema ----------------------------------------------------------------------------------


def cmd_schema(args: argparse.Namespace) -> int:
    if args.what == "spec":
        doc: Any = json_schema()
    else:
        text = resources.files("chute").joinpath(f"schemas/{args.what}.schema.json").read_bytes()
        doc = orjson.loads(text)
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def _options(*, top: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. Below the top level their
    default is SUPPRESS: an option left out after the command must not overwrite one given
    before it (argparse's subparsers would set their own default over it)."""
    common = argparse.ArgumentParser(add_help=False)
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    common.add_argument(
        "--spool", help="spool folder (default: $CHUTE_SPOOL, the config's, ./spool)", **default
    )
    common.add_argument(
        "--config", help="config file (default: $CHUTE_CONFIG, /etc/chute/chute.yaml)", **default
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log debug lines", **default)
    common.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only", **default
    )
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chute",
        description="chute: drop YAML job and pipeline files into a spool; chute runs them.",
        parents=[_options(top=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _options(top=False)

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        synopsis: str,
        example: str,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[common],
            help=synopsis,
            description=f"{synopsis}\n\nexample:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    p = add(
        "validate",
        cmd_validate,
        "chute validate FILE...: check files; print errors or the stage plan",
        "chute validate spool/examples/etl.yaml",
    )
    p.add_argument("files", nargs="+", metavar="FILE")

    p = add(
        "run",
        cmd_run,
        "chute run FILE [--here]: run a job or pipeline once and follow it (by the daemon "
        "when one runs on the spool)",
        "chute run spool/examples/etl.yaml",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--here",
        action="store_true",
        help="with a daemon on the spool: run in this process on cores it does not use, "
        "instead of handing the run to it",
    )

    p = add(
        "show",
        cmd_show,
        "chute show RUN|latest: the execution summary of a run",
        "chute show latest",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print run.json and manifest.json")

    p = add(
        "logs",
        cmd_logs,
        "chute logs RUN [STAGE] [-f]: print a run's stage logs",
        "chute logs latest extract",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("stage", nargs="?", metavar="STAGE")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")

    p = add(
        "retry",
        cmd_retry,
        "chute retry RUN [--from STAGE]: a new run that keeps the old run's succeeded stages",
        "chute retry latest --from validate",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="run STAGE and what follows it again"
    )

    p.add_argument(
        "--wait", action="store_true", help="with a daemon: follow the new run to its end"
    )

    add(
        "daemon",
        cmd_daemon,
        "chute daemon: run the spool daemon in the foreground",
        "chute daemon --spool spool",
    )

    p = add(
        "submit",
        cmd_submit,
        "chute submit FILE... [--wait]: validate files, drop them into incoming/ and print "
        "the run each became",
        "chute submit spool/examples/etl.yaml --wait",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the run with live progress; exit with its result",
    )

    add(
        "status",
        cmd_status,
        "chute status: is the daemon up (exit 3 if not), CPUs by NUMA node, queued and running",
        "chute status",
    )

    p = add(
        "runs",
        cmd_runs,
        "chute runs [--pipeline N] [--state S] [--limit N]: list runs, newest first",
        "chute runs --state failed",
    )
    p.add_argument("--pipeline", metavar="NAME")
    p.add_argument("--state", choices=rundir.RUN_STATES)
    p.add_argument("--limit", type=int, default=20)

    p = add(
        "cancel",
        cmd_cancel,
        "chute cancel RUN: stop a queued or running run (idempotent)",
        "chute cancel latest",
    )
    p.add_argument("run", metavar="RUN")

    add(
        "schedules",
        cmd_schedules,
        "chute schedules: recurring definitions with their next fire times",
        "chute schedules",
    )

    p = add(
        "unschedule",
        cmd_unschedule,
        "chute unschedule NAME: remove a recurring definition",
        "chute unschedule nightly-cleanup",
    )
    p.add_argument("name", metavar="NAME")

    add(
        "gc",
        cmd_gc,
        "chute gc: remove finished runs beyond the retention of the config",
        "chute gc --config /etc/chute/chute.yaml",
    )

    p = add(
        "schema",
        cmd_schema,
        "chute schema spec|run|manifest|output: print a JSON Schema",
        "chute schema spec > chute.schema.json",
    )
    p.add_argument("what", choices=("spec", "run", "manifest", "output"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logs.setup(level)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as exc:  # the spool's modes: one line, not a traceback
        print(f"{exc.filename or 'the spool'}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
