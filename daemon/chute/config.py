"""The daemon's configuration: one YAML file, every key optional, unknown keys refused.

Owns: reading `--config`, `$CHUTE_CONFIG` or /etc/chute/chute.yaml into a frozen Config,
and `$CHUTE_LISTEN` over its http.listen (the Config says which gave the address).
The file is read as spec files are (chute.spec.load: YAML 1.2, so `yes` is a string; no
aliases; a key written twice is an error), and durations and sizes need their unit (`30s`,
`4096B`), as in specs (chute.units).
Not here: the spool layout (chute.store.spool), the node's CPUs (chute.scheduling.topology).
Diagnostics: a bad file raises ConfigError naming the file, the key and the valid choices;
the CLI prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chute.spec.load import SpecError, load_plain
from chute.units import no_unit, parse_duration, parse_size

SYSTEM_CONFIG = Path("/etc/chute/chute.yaml")
LISTEN_ENV = "CHUTE_LISTEN"  # overrides http.listen
LISTEN_OPTION = "--listen"  # `chute daemon --listen`: overrides both
POLICIES = ("fifo-first-fit", "best-fit", "backfill")


class ConfigError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Config:
    spool: Path | None = None
    runs_dir: Path | None = None
    cpus: str | int = "auto"
    reserve_cpus: int = 0
    memory: str | int = "auto"
    policy: str = "fifo-first-fit"
    watch: str = "auto"
    rescan_interval: float = 30.0
    stop_timeout: float = 60.0
    kill_grace: float = 10.0
    on_restart: str = "resume"
    max_file_size: int = 1 << 20
    log_limit: int = 64 << 20
    submitters_users: tuple[str, ...] = ()
    submitters_groups: tuple[str, ...] = ()
    admins_users: tuple[str, ...] = ()
    admins_groups: tuple[str, ...] = ()
    http_listen: str = "127.0.0.1:9842"
    http_listen_from: str = "http.listen"  # or LISTEN_ENV, or `--listen` (chute daemon)
    http_token_file: Path | None = None
    keep_runs: int = 1000
    max_age: float = 30 * 86400.0
    rejected_max_age: float = 30 * 86400.0
    cache_max_age: float = 30 * 86400.0
    cache_max_size: int | None = 10 << 30  # None: no bound on cache/'s size
    executor_backend: str = "local"
    executor_address: str | None = None
    log_format: str = "text"
    sync: str = "auto"
    source: Path | None = field(default=None, compare=False)


_KEYS = {
    "spool",
    "runs_dir",
    "cpus",
    "reserve_cpus",
    "memory",
    "policy",
    "watch",
    "rescan_interval",
    "stop_timeout",
    "kill_grace",
    "on_restart",
    "max_file_size",
    "log_limit",
    "submitters",
    "admins",
    "http",
    "retention",
    "executor",
    "log_format",
    "sync",
}


_RETENTION_KEYS = {"keep_runs", "max_age", "rejected_max_age", "cache_max_age", "cache_max_size"}


def _unknown(where: str, key: object, valid: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}{key}: unknown key (valid keys: {', '.join(sorted(valid))}){hint}"


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def _mapping(key: str, value: object, valid: set[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected a mapping with keys {', '.join(sorted(valid))}")
    for k in value:
        if k not in valid:
            raise ValueError(_unknown(f"{key}.", k, valid))
    return value


def _duration(key: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"{key}: {no_unit(str(value), str(value), 'duration')}")
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _size(key: str, value: object) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"{key}: {no_unit(str(value), str(value), 'size')}")
    try:
        return parse_size(str(value))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _path(value: object) -> Path | None:
    return None if value is None else Path(str(value))


def _int(key: str, value: object, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key}: {value!r} is not a whole number >= {minimum}")
    return value


def _strings(key: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a list of names")
    return tuple(value)


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Config from a mapping; ValueError lists every bad key at once (one per line)."""
    problems: list[str] = []
    values: dict[str, Any] = {"source": source}

    def take(key: str, convert: Any) -> None:
        if key in data:
            try:
                convert()
            except ValueError as exc:
                problems.append(str(exc))

    for key in data:
        if key not in _KEYS:
            problems.append(_unknown("", key, _KEYS))

    def cpus() -> None:
        v = data["cpus"]
        if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            values["cpus"] = v
        else:
            raise ValueError(f"cpus: {v!r} is not auto, a count or a cpulist like '0-31,64-95'")

    def memory() -> None:
        v = data["memory"]
        values["memory"] = "auto" if v == "auto" else _size("memory", v)

    def submitters() -> None:
        m = _mapping("submitters", data["submitters"], {"users", "groups"})
        values["submitters_users"] = _strings("submitters.users", m.get("users"))
        values["submitters_groups"] = _strings("submitters.groups", m.get("groups"))

    def admins() -> None:
        m = _mapping("admins", data["admins"], {"users", "groups"})
        values["admins_users"] = _strings("admins.users", m.get("users"))
        values["admins_groups"] = _strings("admins.groups", m.get("groups"))

    def http() -> None:
        m = _mapping("http", data["http"], {"listen", "token_file"})
        if "listen" in m:
            values["http_listen"] = str(m["listen"])
        if m.get("token_file") is not None:
            values["http_token_file"] = Path(str(m["token_file"]))

    def retention() -> None:
        m = _mapping("retention", data["retention"], _RETENTION_KEYS)
        for key in sorted(m):
            try:
                if key == "keep_runs":
                    values[key] = _int("retention.keep_runs", m[key])
                elif key == "cache_max_size":  # null: no bound
                    size = m[key]
                    values[key] = None if size is None else _size(f"retention.{key}", size)
                else:
                    values[key] = _duration(f"retention.{key}", m[key])
            except ValueError as exc:
                problems.append(str(exc))

    def executor() -> None:
        m = _mapping("executor", data["executor"], {"backend", "address"})
        values["executor_backend"] = _choice(
            "executor.backend", m.get("backend", "local"), ("local", "dask")
        )
        if values["executor_backend"] == "dask":
            raise ValueError("executor.backend: dask is not available in this version; use local")
        if m.get("address") is not None:
            values["executor_address"] = str(m["address"])

    take("spool", lambda: values.__setitem__("spool", _path(data["spool"])))
    take("runs_dir", lambda: values.__setitem__("runs_dir", _path(data["runs_dir"])))
    take("cpus", cpus)
    take(
        "reserve_cpus",
        lambda: values.__setitem__("reserve_cpus", _int("reserve_cpus", data["reserve_cpus"])),
    )
    take("memory", memory)
    take(
        "policy", lambda: values.__setitem__("policy", _choice("policy", data["policy"], POLICIES))
    )
    take(
        "watch",
        lambda: values.__setitem__("watch", _choice("watch", data["watch"], ("auto", "poll"))),
    )
    take(
        "rescan_interval",
        lambda: values.__setitem__(
            "rescan_interval", _duration("rescan_interval", data["rescan_interval"])
        ),
    )
    take(
        "stop_timeout",
        lambda: values.__setitem__("stop_timeout", _duration("stop_timeout", data["stop_timeout"])),
    )
    take(
        "kill_grace",
        lambda: values.__setitem__("kill_grace", _duration("kill_grace", data["kill_grace"])),
    )
    take(
        "on_restart",
        lambda: values.__setitem__(
            "on_restart", _choice("on_restart", data["on_restart"], ("resume", "fail"))
        ),
    )
    take(
        "max_file_size",
        lambda: values.__setitem__("max_file_size", _size("max_file_size", data["max_file_size"])),
    )
    take(
        "log_limit", lambda: values.__setitem__("log_limit", _size("log_limit", data["log_limit"]))
    )
    take("submitters", submitters)
    take("admins", admins)
    take("http", http)
    take("retention", retention)
    take("executor", executor)
    take(
        "log_format",
        lambda: values.__setitem__(
            "log_format", _choice("log_format", data["log_format"], ("text", "json"))
        ),
    )
    take(
        "sync",
        lambda: values.__setitem__(
            "sync", _choice("sync", data["sync"], ("auto", "fsync", "syncfs"))
        ),
    )
    if problems:
        raise ValueError("\n".join(problems))
    return Config(**values)


def load_config(path: Path | str | None = None) -> Config:
    """`path`, else $CHUTE_CONFIG, else /etc/chute/chute.yaml when it exists, else defaults;
    then $CHUTE_LISTEN, when set, in place of http.listen."""
    if path is None:
        env = os.environ.get("CHUTE_CONFIG")
        if env:
            path = Path(env)
        elif SYSTEM_CONFIG.exists():
            path = SYSTEM_CONFIG
        else:
            return _listen_override(Config())
    path = Path(path)
    return _listen_override(_from_file(path))


def _listen_override(config: Config) -> Config:
    """$CHUTE_LISTEN, when set, in place of http.listen (`chute daemon --listen` goes before
    both)."""
    listen = os.environ.get(LISTEN_ENV)
    if not listen:
        return config
    return dataclasses.replace(config, http_listen=listen, http_listen_from=LISTEN_ENV)


def _from_file(path: Path) -> Config:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror}") from None
    try:
        data = load_plain(text, str(path))
    except SpecError as exc:
        raise ConfigError("\n".join(str(issue) for issue in exc.issues)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    try:
        return parse_config(data, path)
    except ValueError as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None
