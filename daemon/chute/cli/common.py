"""What every command shares: exit codes, UsageError, and its arguments made into things.

Owns: the exit codes, UsageError (a caller's mistake: one line per problem, exit 2), and
turning a command's arguments into a config, a spool, the node's topology, a checked
pipeline, a run folder or a checked name, each mistake as a UsageError; the text table
the listings print, and the JSON document `--json` prints instead. Not here: what those
are (chute.config, chute.store.spool, chute.scheduling.topology, chute.spec,
chute.store.rundir, chute.names); asking the daemon (chute.cli.daemon).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from chute import names
from chute.config import Config, ConfigError, load_config
from chute.observe import logs
from chute.scheduling.topology import Topology, read_topology
from chute.spec import SpecError, load_file
from chute.spec.model import Pipeline
from chute.store import rundir
from chute.store.spool import Spool, resolve_spool

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NOT_RUNNING = 3  # `chute status` with no daemon: the LSB and `systemctl status` code


class UsageError(Exception):
    """A mistake of the caller: printed as one line per problem, exit 2."""


def config(args: argparse.Namespace) -> Config:
    """The config `args` name; its `log_format` applies to the command's log lines from
    here on (`chute run` logs as the daemon would)."""
    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if loaded.log_format != "text":
        logs.setup(logging.getLogger().level, loaded.log_format)
    return loaded


def spool(args: argparse.Namespace, config: Config) -> Spool:
    return resolve_spool(args.spool, config)


def topology(config: Config) -> Topology:
    try:
        return read_topology(
            cpus=config.cpus, reserve_cpus=config.reserve_cpus, memory=config.memory
        )
    except ValueError as exc:
        raise UsageError(f"config: {exc}") from None


def load(path: str, config: Config, topo: Topology) -> tuple[Pipeline, bytes]:
    try:
        return load_file(
            path,
            max_file_size=config.max_file_size,
            node_cpus=len(topo.cpus),
            node_memory=topo.memory,
        )
    except SpecError as exc:
        raise UsageError("\n".join(str(i) for i in exc.issues)) from None


def find_run(spool: Spool, ref: str) -> Path:
    try:
        return rundir.find_run(spool, ref)  # checks the ref's form first (chute.names)
    except rundir.UnknownRun as exc:
        raise UsageError(str(exc)) from None


def checked_name(check: Callable[[str, str], str], text: str, what: str) -> str:
    """A name from the command line, checked against the form of its kind (chute.names)."""
    try:
        return check(text, what)
    except names.BadName as exc:
        raise UsageError(str(exc)) from None


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """`rows` (the first is the header) as lines of left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def print_json(doc: Any) -> None:
    """`doc` as the one JSON document a `--json` command prints on stdout."""
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
