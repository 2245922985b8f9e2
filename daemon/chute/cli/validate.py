"""`chute validate`: check files as the daemon would, and print each good one's stage plan.

Owns: the stage plan's text (stages in topological order, each with its command, cpus,
shards and what it waits for). Not here: the checks (chute.spec), a trigger's text
(chute.scheduling.schedules).
Diagnostics: every problem of every file, one line each on stderr, then exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from chute.cli import common
from chute.cli.common import EXIT_OK, EXIT_USAGE, UsageError
from chute.spec.model import Pipeline


def cmd_validate(args: argparse.Namespace) -> int:
    config = common.config(args)
    topo = common.topology(config)
    code = EXIT_OK
    for path in args.files:
        try:
            pipeline, _ = common.load(path, config, topo)
        except UsageError as exc:
            print(exc, file=sys.stderr)
            code = EXIT_USAGE
            continue
        print(f"{path}: ok: {pipeline.kind} {pipeline.name}, {_plan(pipeline)}")
    return code


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
    from chute.scheduling.triggers import trigger_text

    assert p.schedule is not None
    return trigger_text(p.schedule)
