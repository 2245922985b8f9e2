"""The config file: defaults, units, choices, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chute.config import Config, ConfigError, load_config, parse_config


def test_every_key_is_optional() -> None:
    assert parse_config({}) == Config()


def test_durations_sizes_and_sections_are_parsed() -> None:
    c = parse_config(
        {
            "cpus": "0-3,8",
            "memory": "4GiB",
            "stop_timeout": "90s",
            "rescan_interval": "1m",
            "max_file_size": "2MiB",
            "retention": {"keep_runs": 10, "max_age": "2d"},
            "http": {"listen": "0.0.0.0:9000", "token_file": "/etc/chute/token"},
            "submitters": {"users": ["alice"], "groups": ["data"]},
            "admins": {"users": ["root"], "groups": ["ops"]},
            "policy": "backfill",
        }
    )
    assert c.cpus == "0-3,8"
    assert c.memory == 4 << 30
    assert c.stop_timeout == 90.0
    assert c.rescan_interval == 60.0
    assert c.max_file_size == 2 << 20
    assert (c.keep_runs, c.max_age) == (10, 172800.0)
    assert c.http_listen == "0.0.0.0:9000"
    assert c.http_token_file == Path("/etc/chute/token")
    assert c.submitters_users == ("alice",)
    assert c.submitters_groups == ("data",)
    assert (c.admins_users, c.admins_groups) == (("root",), ("ops",))
    assert c.policy == "backfill"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stop_timout": "1s"}, "stop_timout: unknown key"),
        ({"stop_timout": "1s"}, "did you mean 'stop_timeout'?"),
        ({"policy": "random"}, "policy: 'random' is not one of fifo-first-fit, best-fit, backfill"),
        ({"stop_timeout": "soon"}, "stop_timeout: 'soon' is not a duration like 500ms"),
        ({"http": {"port": 1}}, "http.port: unknown key"),
        ({"executor": {"backend": "dask"}}, "executor.backend: dask is not available"),
        ({"reserve_cpus": -1}, "reserve_cpus: -1 is not a whole number >= 0"),
        ({"admins": {"user": ["x"]}}, "admins.user: unknown key (valid keys: groups, users)"),
        ({"admins": {"groups": "ops"}}, "admins.groups: expected a list of names"),
        (
            {"retention": {"cache_max_sise": "1GiB"}},
            "retention.cache_max_sise: unknown key (valid keys: cache_max_age, cache_max_size, "
            "keep_runs, max_age, rejected_max_age); did you mean 'cache_max_size'?",
        ),
        (
            {"retention": {"cache_max_size": "lots"}},
            "retention.cache_max_size: 'lots' is not a size",
        ),
        ({"retention": {"rejected_max_age": "soon"}}, "retention.rejected_max_age: 'soon' is not"),
    ],
    ids=[
        "unknown",
        "suggestion",
        "choice",
        "duration",
        "section",
        "dask",
        "negative",
        "admins-key",
        "admins-not-a-list",
        "retention-key",
        "retention-size",
        "retention-duration",
    ],
)
def test_bad_values_are_refused_with_the_key_and_the_rule(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(data)


def test_retention_takes_ages_of_rejected_files_and_cache_entries_and_a_cache_bound() -> None:
    assert (Config().rejected_max_age, Config().cache_max_age) == (30 * 86400.0, 30 * 86400.0)
    assert Config().cache_max_size == 10 << 30
    c = parse_config(
        {
            "retention": {
                "rejected_max_age": "7d",
                "cache_max_age": "12h",
                "cache_max_size": "512MiB",
            }
        }
    )
    assert (c.rejected_max_age, c.cache_max_age, c.cache_max_size) == (
        7 * 86400.0,
        43200.0,
        512 << 20,
    )
    assert parse_config({"retention": {"cache_max_size": None}}).cache_max_size is None


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ValueError, match="policy: 'x'") as info:
        parse_config(
            {"policy": "x", "watch": "y", "retention": {"max_age": "z", "cache_max_size": "w"}}
        )
    assert len(str(info.value).splitlines()) == 4


def test_load_config_prefixes_the_file_and_reads_chute_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "chute.yaml"
    path.write_text("policy: best-fit\n")
    monkeypatch.setenv("CHUTE_CONFIG", str(path))
    assert load_config().policy == "best-fit"
    path.write_text("policy: nope\n")
    with pytest.raises(ConfigError, match=f"^{path}: policy: 'nope'"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_null_paths_mean_the_default() -> None:
    c = parse_config({"spool": None, "runs_dir": None})
    assert c.spool is None
    assert c.runs_dir is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stop_timeout: 30\n", "stop_timeout: 30 has no unit; expected a duration like 500ms, "
         "30s, 20m, 1h or 2d (30s for seconds)"),
        ('stop_timeout: "30"\n', "stop_timeout: '30' has no unit; expected a duration like "
         "500ms, 30s, 20m, 1h or 2d (30s for seconds)"),
        ("memory: 4096\n", "memory: 4096 has no unit; expected a size like 512MiB or 4GiB "
         "(4096B for bytes)"),
        ('max_file_size: "4096"\n', "max_file_size: '4096' has no unit; expected a size like "
         "512MiB or 4GiB (4096B for bytes)"),
        ("watch: off\n", "watch: 'off' is not one of auto, poll"),
        ("policy: &p best-fit\n", ":1: aliases and anchors are not supported; write the value out"),
        ("sync: fsync\nsync: syncfs\n", ":2: sync: appears twice in one mapping (first at line 1); "
         "YAML would silently keep the last — keep one"),
    ],
    ids=["duration", "quoted-duration", "size", "quoted-size", "yaml-1.2-off", "anchor",
         "key-twice"],
)  # fmt: skip
def test_config_file_is_read_as_specs_are(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "chute.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    where = f"{path}" if message.startswith(":") else f"{path}: "  # a YAML issue has its line
    assert str(info.value) == where + message
