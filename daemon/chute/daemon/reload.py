"""SIGHUP: the config file read again, and each changed key applied where it lives.

Owns: which keys a reload applies and how (policy, sync, intake limits, submitters, admins,
the HTTP token, retention, stop_timeout and rescan_interval at once; cpus, reserve_cpus and
memory for tasks that start after; kill_grace and log_limit for tasks started after;
on_restart at the next start), and which need a restart (RESTART_KEYS). Not here: reading
and checking the file (chute.config).
Diagnostics: a config that does not load is one ERROR line, and the running config stays;
a key that needs a restart is one WARNING line. systemd hears RELOADING=1, then READY=1.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from chute.config import LISTEN_OPTION, Config, ConfigError, load_config
from chute.observe import logs
from chute.observe.http import HttpError, read_token
from chute.scheduling.topology import Topology, read_topology
from chute.store import retention
from chute.store.spool import sync_roots
from chute.units import format_size

if TYPE_CHECKING:
    from .service import Daemon

log = logging.getLogger(__name__)

RESTART_KEYS = ("spool", "runs_dir", "http_listen", "watch")


def topology_of(config: Config) -> Topology:
    """The node's CPUs and memory as `config` describes them (ValueError says what is wrong)."""
    return read_topology(cpus=config.cpus, reserve_cpus=config.reserve_cpus, memory=config.memory)


def reload(d: Daemon) -> None:
    """Read the config file again and apply it to the running daemon `d`."""
    d.notifier.reloading()
    try:
        new = load_config(d.config_path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        d.notifier.ready(d.status.text())
        return
    old = d.config
    if old.http_listen_from == LISTEN_OPTION:  # the command line's, for the daemon's life
        new = dataclasses.replace(new, http_listen=old.http_listen, http_listen_from=LISTEN_OPTION)
    for key in RESTART_KEYS:
        if getattr(new, key) != getattr(old, key):
            log.warning("config %s changed: takes effect after a restart", key)
    if new.sync != old.sync:
        d.syncfs = sync_roots(new, d.spool)
        d.engine.use_syncfs(d.syncfs)
        log.info("config sync=%s: %s", new.sync, "syncfs" if d.syncfs else "fsync")
    if (new.cpus, new.reserve_cpus, new.memory) != (old.cpus, old.reserve_cpus, old.memory):
        _topology(d, new)
    d.executor.configure(
        kill_grace=new.kill_grace, log_limit=new.log_limit, max_workers=len(d.topology.cpus)
    )
    if new.log_format != old.log_format:
        logs.setup(logging.getLogger().level, new.log_format)
    d.retention.changed |= retention.Rules.of(new) != retention.Rules.of(old)
    d.config = new
    d.engine.policy = new.policy
    d.intake.config = new
    if d.http is not None:
        try:
            d.http.token = read_token(new.http_token_file)
        except HttpError as exc:
            log.error("%s; keeping the previous token", exc)
    log.info("config reloaded from %s", d.config_path or "defaults")
    d.notifier.ready(d.status.text())


def _topology(d: Daemon, new: Config) -> None:
    """Use the CPUs and memory of `new` from now on: running tasks keep their cores (one
    on a core taken away ends as it would have); waiting ones get the new cores."""
    try:
        topology = topology_of(new)
    except (ValueError, OSError) as exc:
        log.error("config cpus/memory: %s; keeping the node as it was", exc)
        return
    d.topology = topology
    d.engine.topology = topology
    d.intake.node_cpus = len(topology.cpus)
    d.intake.node_memory = topology.memory
    log.info(
        "config cpus=%s (%d) memory=%s",
        topology.cpulist(topology.cpus),
        len(topology.cpus),
        format_size(topology.memory),
    )
    too_big = d.engine.waiting_beyond(topology)
    if too_big:
        log.warning(
            "%d waiting task(s) need more cpus or memory than the node now has and wait "
            "until a reload gives them back (or cancel their runs): %s",
            len(too_big),
            ", ".join(too_big[:10]),
        )
