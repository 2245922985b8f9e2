"""The command line: one subcommand per verb, and `main`, the console script.

Owns: the parser (the options every command takes, each subcommand's synopsis, example and
arguments), the log level, and turning what a command raises into its exit code. Not here:
the commands (chute.cli.validate, foreground, show, submit, daemon, schema).
Diagnostics: a UsageError prints one line per problem to stderr and exits 2, as does a
PermissionError on the spool (one line, no traceback); a closed stdout (`| head`) exits 1
quietly; a chute bug prints a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from chute import __version__
from chute.cli.common import EXIT_FAILED, EXIT_USAGE, UsageError
from chute.cli.daemon import (
    cmd_cancel,
    cmd_daemon,
    cmd_gc,
    cmd_schedules,
    cmd_status,
    cmd_unschedule,
)
from chute.cli.foreground import cmd_retry, cmd_run
from chute.cli.schema import cmd_schema
from chute.cli.show import cmd_logs, cmd_runs, cmd_show
from chute.cli.submit import cmd_submit
from chute.cli.validate import cmd_validate
from chute.observe import logs
from chute.store import rundir


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
    parser.add_argument(
        "--version",
        action="version",
        version=f"chute {__version__}",  # what the metric chute_build_info says
        help="print `chute <version>` and exit",
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
    p.add_argument("files", nargs="+", metavar="FILE", help="Job or Pipeline files to check")

    p = add(
        "run",
        cmd_run,
        "chute run FILE [--here]: run a job or pipeline once and follow it (by the daemon "
        "when one runs on the spool)",
        "chute run spool/examples/etl.yaml",
    )
    p.add_argument("file", metavar="FILE", help="the Job or Pipeline file to run")
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
    p.add_argument(
        "run", metavar="RUN", help="a run id, a unique prefix of one, latest or PIPELINE/latest"
    )
    p.add_argument("--json", action="store_true", help="print run.json and manifest.json")

    p = add(
        "logs",
        cmd_logs,
        "chute logs RUN [STAGE] [-f] [-n N] [--since DURATION|TIME]: print a run's stage logs",
        "chute logs latest extract -n 20",
    )
    p.add_argument(
        "run", metavar="RUN", help="a run id, a unique prefix of one, latest or PIPELINE/latest"
    )
    p.add_argument(
        "stage",
        nargs="?",
        metavar="STAGE",
        help="one stage, or one shard as 'name[N]' (default: all)",
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    p.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N lines of each log")
    p.add_argument(
        "--since",
        metavar="DURATION|TIME",
        help="only the attempts that started at or after TIME (or DURATION ago): an "
        "attempt's lines carry no time, its header does",
    )

    p = add(
        "retry",
        cmd_retry,
        "chute retry RUN [--from STAGE]: a new run that keeps the old run's succeeded stages",
        "chute retry latest --from validate",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="the run to retry: a run id, a unique prefix of one, latest or PIPELINE/latest",
    )
    p.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="run STAGE and what follows it again"
    )

    p.add_argument(
        "--wait", action="store_true", help="with a daemon: follow the new run to its end"
    )

    p = add(
        "daemon",
        cmd_daemon,
        "chute daemon [--listen ADDR]: run the spool daemon in the foreground",
        "chute daemon --spool spool --listen 127.0.0.1:9843",
    )
    p.add_argument(
        "--listen",
        metavar="ADDR",
        help="host:port of the HTTP endpoint, over $CHUTE_LISTEN and the config's http.listen",
    )

    p = add(
        "submit",
        cmd_submit,
        "chute submit FILE... [--wait] [--json]: validate files, drop them into incoming/ and "
        "print the run each became",
        "chute submit spool/examples/etl.yaml --wait",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="Job or Pipeline files to submit")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the run with live progress; exit with its result",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON array: each file's outcome (and with --wait its run's end)",
    )

    p = add(
        "status",
        cmd_status,
        "chute status [--json]: is the daemon up (exit 3 if not), CPUs by NUMA node, queued "
        "and running",
        "chute status",
    )
    p.add_argument(
        "--json", action="store_true", help="print state/status.json (null when no daemon runs)"
    )

    p = add(
        "runs",
        cmd_runs,
        "chute runs [--pipeline N] [--state S] [--limit N] [--json]: list runs, newest first",
        "chute runs --state failed",
    )
    p.add_argument("--pipeline", metavar="NAME")
    p.add_argument("--state", choices=rundir.RUN_STATES)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print a JSON array of the runs' run.json")

    p = add(
        "cancel",
        cmd_cancel,
        "chute cancel RUN... | --pipeline NAME | --state queued|running: stop queued or "
        "running runs (idempotent)",
        "chute cancel --pipeline nightly-etl --state queued",
    )
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="runs to cancel: a run id, a unique prefix of one, latest or PIPELINE/latest",
    )
    p.add_argument("--pipeline", metavar="NAME", help="the runs of pipeline NAME not ended")
    p.add_argument(
        "--state",
        metavar="STATE",
        help="the runs in STATE, queued or running (with --pipeline, of that pipeline)",
    )

    p = add(
        "schedules",
        cmd_schedules,
        "chute schedules [--json]: recurring definitions with their next fire times",
        "chute schedules",
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON array of {name, trigger, next_fire}"
    )

    p = add(
        "unschedule",
        cmd_unschedule,
        "chute unschedule NAME: remove a recurring definition",
        "chute unschedule nightly-cleanup",
    )
    p.add_argument("name", metavar="NAME", help="the schedule's name (its file's metadata.name)")

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
    p.add_argument(
        "what",
        choices=("spec", "run", "manifest", "output"),
        help="a spec file, run.json, manifest.json or output.json",
    )
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
