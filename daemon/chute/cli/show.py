"""What runs did, read from their folders: `chute show`, `chute logs` and `chute runs`.

Owns: the execution summary (a row per stage and shard, the tally, and for a run not
finished what it waits for), printing and following stage logs (all, or the attempts
started since a time, or their last lines), and the list of runs.
Not here: the run folder's files (chute.store.rundir), the reasons work waits
(chute.engine.reasons), the timeline and report.html (chute.observe.report), the daemon's
status.json (chute.cli.daemon).
Diagnostics: an unknown run, stage or shard is a UsageError that lists what there is. A log
a task replaced (a link, a FIFO, a folder) or cannot be opened is one line on stderr and
exit 1; the other logs print.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from chute import names
from chute.cli import common
from chute.cli.common import EXIT_FAILED, EXIT_OK, UsageError
from chute.cli.daemon import daemon_status
from chute.clock import parse_rfc3339
from chute.engine import reasons
from chute.engine.stage import STAGE_OK
from chute.observe import report
from chute.scheduling.topology import format_cpulist
from chute.spec import SpecError, load_bytes
from chute.store import rundir, taskfiles
from chute.units import DURATION_HINT, format_duration, parse_duration

SPEC_LIMIT = 64 << 20  # bytes of a run's spec.yaml read back (intake took max_file_size)
SHARD_REF = re.compile(r"(.+)\[(\d+)\]")  # `measure[1]`, as log headers name a shard
# The line the engine writes before every attempt after the first, and before a fallback
# (chute.engine.loop): its time is when that attempt started.
ATTEMPT_HEADER = re.compile(rb"--- chute: (?:attempt [0-9]+|fallback) at (\S+) ---")
LOG_POLL = 0.2  # seconds between looks at growing logs


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
        *common.table(rows),
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
    entry = _waiting_entry(status, rec["run_id"])
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


def _waiting_entry(status: dict[str, Any] | None, run_id: str) -> dict[str, Any] | None:
    """The entry of `run_id` in status.json's list of waiting runs, if it is listed."""
    if status is None:
        return None
    return next((w for w in status.get("waiting", []) if w.get("run_id") == run_id), None)


def cmd_show(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    run_dir = common.find_run(spool, args.run)
    if args.json:
        entry = _waiting_entry(daemon_status(spool), run_dir.name)
        doc = {
            "run": rundir.read_json(run_dir / "run.json"),
            "manifest": rundir.read_json(run_dir / "manifest.json")
            if (run_dir / "manifest.json").exists()
            else None,
            "waiting": None
            if entry is None
            else {k: entry[k] for k in ("for", "since", "position")},
        }
        common.print_json(doc)
    else:
        print(summary(run_dir, daemon_status(spool)))
        timeline = report.text_timeline(run_dir)
        if timeline:
            print(timeline)
        if (run_dir / report.REPORT_NAME).exists():
            print(f"report: {run_dir / report.REPORT_NAME}")
    return EXIT_OK


def _log_files(run_dir: Path, stage: str | None) -> list[tuple[str, Path]]:
    stages_dir = run_dir / "stages"
    shard = SHARD_REF.fullmatch(stage) if stage is not None else None
    if stage is not None and shard is not None and not (stages_dir / stage).is_dir():
        name, index = shard.group(1), int(shard.group(2))
        log_path = stages_dir / name / str(index) / "log"
        if not os.path.lexists(log_path):
            raise UsageError(f"{stage}: no log of shard {index} of stage {name} in {run_dir.name}")
        return [(f"{name}[{index}]", log_path)]
    if stage is not None:
        common.checked_name(names.name, stage, "stage name")
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
            sorted(
                p.name for p in stages_dir.iterdir() if not p.name.startswith(".") and p.is_dir()
            )
            if stages_dir.is_dir()
            else []
        )
    out: list[tuple[str, Path]] = []
    for name in stage_names:
        folder = stages_dir / name
        if os.path.lexists(folder / "log"):
            out.append((name, folder / "log"))
        shards = sorted(
            (p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        out.extend((f"{name}[{p.name}]", p / "log") for p in shards if os.path.lexists(p / "log"))
    return out


def _open_log(path: Path) -> int:
    """A descriptor of the log at `path`. A task may have put anything in its place: a link,
    a FIFO or a folder raises NotRegular (chute.store.taskfiles) instead of being followed
    or blocked on."""
    return taskfiles.open_regular(str(path), os.O_RDONLY)


def _unreadable_log(path: Path, exc: OSError) -> str:
    if isinstance(exc, taskfiles.NotRegular):
        return f"{path}: {exc.strerror}; not printed: chute reads a log only from a regular file"
    return f"{path}: {exc.strerror}"


def cmd_logs(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    run_dir = common.find_run(spool, args.run)
    files = _log_files(run_dir, args.stage)
    if args.lines is not None and args.lines < 0:
        raise UsageError(f"-n: {args.lines} is not a count of lines; give 0 or more")
    since = None if args.since is None else _since(args.since)
    pick = _Pick(run_dir, args.lines, since)
    if args.follow:
        return _follow_logs(run_dir, args.stage, pick)
    code = EXIT_OK
    for name, path in files:
        if len(files) > 1 or args.stage is None:
            print(f"==> {name} <==")
        try:
            with open(_open_log(path), "rb") as f:
                data = f.read()
        except OSError as exc:
            sys.stdout.flush()
            print(_unreadable_log(path, exc), file=sys.stderr)
            code = EXIT_FAILED
            continue
        sys.stdout.write(pick(name, data).decode(errors="replace"))
    return code


def _since(text: str) -> float:
    """`--since`: a duration back from now (`2h`, `1h30m`) or a time (`2026-12-07T21:50Z`;
    without an offset, local time), as epoch seconds."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text[:-1] + "Z" if text.endswith("z") else text)
    except ValueError:
        raise UsageError(
            f"--since: {text!r} is neither {DURATION_HINT} nor a time like "
            "2026-12-07T21:50:00Z (local time without an offset)"
        ) from None
    return when.timestamp()  # a naive datetime is local time


class _Pick:
    """What `chute logs` prints of a log: with `since`, the attempts that started at or
    after it (an attempt after the first starts at its header line, whose time it carries;
    the first started when the manifest says, else when the run did); then with `lines`,
    the last that many lines of that."""

    def __init__(self, run_dir: Path, lines: int | None, since: float | None) -> None:
        self.lines, self.since = lines, since
        self._firsts: dict[str, float] | None = None
        self._run_dir = run_dir

    def __call__(self, name: str, data: bytes) -> bytes:
        if self.since is not None:
            data = self._attempts_since(name, data, self.since)
        if self.lines is not None:
            kept = data.splitlines(keepends=True)[-self.lines :] if self.lines else []
            data = b"".join(kept)
        return data

    def _attempts_since(self, name: str, data: bytes, since: float) -> bytes:
        starts = [(0, self._first_start(name))]
        for m in ATTEMPT_HEADER.finditer(data):
            if m.start() == 0 or data[m.start() - 1 : m.start()] == b"\n":
                try:
                    starts.append((m.start(), parse_rfc3339(m.group(1).decode()).timestamp()))
                except ValueError:
                    continue  # a task printed something like a header: its text, not one
        for offset, started in starts:
            if started >= since:
                return data[offset:]
        return b""

    def _first_start(self, name: str) -> float:
        """When the first attempt of the log `name` (`stage` or `stage[i]`) started."""
        if self._firsts is None:
            self._firsts = {}
            try:
                manifest = rundir.read_json(self._run_dir / "manifest.json")
                for s in manifest["stages"]:
                    for key, entry in [(s["name"], s)] + [
                        (f"{s['name']}[{sh['index']}]", sh) for sh in s["shards"]
                    ]:
                        if entry["attempts"] and entry["attempts"][0].get("started_at"):
                            started = parse_rfc3339(entry["attempts"][0]["started_at"])
                            self._firsts[key] = started.timestamp()
            except (OSError, ValueError, KeyError, TypeError):
                pass
        if name in self._firsts:
            return self._firsts[name]
        rec = rundir.read_json(self._run_dir / "run.json")
        return parse_rfc3339(rec.get("started_at") or rec["created_at"]).timestamp()


def _follow_logs(run_dir: Path, stage: str | None, pick: _Pick) -> int:
    """Print logs as they grow until the run has ended; exit 1 if one could not be read.
    Of the logs there at the start, `pick` says what is printed before what they gain."""
    offsets: dict[Path, int] = {}
    unreadable: set[Path] = set()  # said once each, then left alone
    first = True
    while True:
        final = rundir.read_json(run_dir / "run.json")["state"] in rundir.FINAL_RUN_STATES
        for name, path in _log_files(run_dir, stage):
            if path in unreadable:
                continue
            try:
                with open(_open_log(path), "rb") as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
                    offsets[path] = f.tell()
            except OSError as exc:
                sys.stdout.flush()
                print(_unreadable_log(path, exc), file=sys.stderr)
                unreadable.add(path)
                continue
            if first:
                chunk = pick(name, chunk)
            if chunk:
                for line in chunk.decode(errors="replace").splitlines():
                    print(f"{name}: {line}")
                sys.stdout.flush()
        if final:
            return EXIT_FAILED if unreadable else EXIT_OK
        first = False
        time.sleep(LOG_POLL)


def cmd_runs(args: argparse.Namespace) -> int:
    config = common.config(args)
    spool = common.spool(args, config)
    records: list[tuple[str, dict[str, Any]]] = []
    for run_id in reversed(rundir.run_ids(spool)):
        if len(records) >= args.limit:
            break
        try:
            rec = rundir.read_json(spool.runs / run_id / "run.json")
        except (OSError, orjson.JSONDecodeError):
            continue
        if args.pipeline and rec["pipeline"] != args.pipeline:
            continue
        if args.state and rec["state"] != args.state:
            continue
        records.append((run_id, rec))
    if args.json:  # each run's run.json as it is (`chute schema run` describes it)
        common.print_json([rec for _, rec in records])
        return EXIT_OK
    rows = [["RUN", "PIPELINE", "STATE", "TRIGGER", "CREATED", "DURATION"]]
    for run_id, rec in records:
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
    print("\n".join(common.table(rows)))
    return EXIT_OK
