"""Retention: runs, pipelines/ links, rejected/ and cache/ removed by age and size, never what
is active; the daemon's pass, SIGHUP and `chute gc`, on runs and files made for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chute.clock import parse_rfc3339
from chute.store import retention
from chute.store.spool import Spool
from conftest import Chute, load_json, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, job, runs_of

__all__ = ["daemon_factory"]

FINAL = ("succeeded", "failed", "cancelled", "interrupted")
HOUR = 3600.0


def finished(spool: Path) -> list[dict[str, object]]:
    return [r for r in runs_of(spool) if r["state"] in FINAL]


def run_folders(spool: Path) -> list[str]:
    return sorted(p.name for p in (spool / "runs").iterdir() if not p.is_symlink())


def pipelines(spool: Path) -> dict[str, str]:
    """pipelines/<name> -> the run id its latest link names ("" when it has none)."""
    out = {}
    for folder in sorted((spool / "pipelines").iterdir()):
        link = folder / "latest"
        out[folder.name] = os.path.basename(os.readlink(link)) if link.is_symlink() else ""
    return out


def age(path: Path, seconds: float) -> None:
    """Set `path`'s mtime `seconds` into the past (not following a link)."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def gc_config(tmp_path: Path, retention_yaml: str) -> Path:
    path = tmp_path / "gc.yaml"
    path.write_text(f"retention: {retention_yaml}\n")
    return path


def cache_job(name: str, fill: str, size: int = 10) -> str:
    """A Job whose cached output is `size` bytes of `fill`."""
    write = (
        "import json, os; "
        f"json.dump({{'x': '{fill}' * {size}}}, open(os.environ['CHUTE_OUTPUT'], 'w'))"
    )
    command = json.dumps(f'{sys.executable} -c "{write}"')
    return (
        f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
        f"spec:\n  run: {command}\n  cache: true\n"
    )


def queue_empty(spool: Path) -> bool:
    """No run waits or runs: the daemon removed each queue file after its final run.json."""
    return not list((spool / "queue").glob("*.yaml"))


def rules(**changes: float | int | None) -> retention.Rules:
    values: dict[str, float | int | None] = {
        "keep_runs": 1000,
        "max_age": 30 * 86400.0,
        "rejected_max_age": 30 * 86400.0,
        "cache_max_age": 30 * 86400.0,
        "cache_max_size": None,
    }
    values.update(changes)
    return retention.Rules(**values)  # type: ignore[arg-type]


@pytest.mark.slow
def test_max_age_frees_one_off_runs_and_their_pipeline_links(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    """198 jobs of distinct names are each their pipeline's latest run: within max_age they
    stay whatever keep_runs says; past it only runs/latest does, and their links go too."""
    d = daemon_factory("cpus: 2\n").start()
    for i in range(198):
        drop(spool, f"once-{i:03d}.yaml", job(f"once-{i:03d}", "true"))
    wait_for("198 finished runs", lambda: len(finished(spool)) == 198, 90)
    assert d.stop() == 0
    newest = os.readlink(spool / "runs" / "latest")

    done = chute("gc", "--config", str(gc_config(tmp_path, "{keep_runs: 5, max_age: 30d}")))
    assert (done.code, done.err) == (0, "")
    assert done.out.splitlines()[:2] == [
        "removed 0 run(s) (keep_runs 5, max_age 30d)",
        "removed 0 pipeline latest link(s) to removed runs",
    ]
    assert len(run_folders(spool)) == 198

    done = chute("gc", "--config", str(gc_config(tmp_path, "{keep_runs: 5, max_age: 0s}")))
    assert (done.code, done.err) == (0, "")
    assert done.out.splitlines()[:2] == [
        "removed 197 run(s) (keep_runs 5, max_age 0.00s)",
        "removed 197 pipeline latest link(s) to removed runs",
    ]
    assert run_folders(spool) == [newest]
    assert pipelines(spool) == {"once-197": newest}
    shown = chute("show", "once-197/latest")
    assert shown.code == 0, shown.err
    gone = chute("show", "once-000/latest")
    assert (gone.code, gone.err.strip()) == (2, "once-000/latest: no run yet for that pipeline")


@pytest.mark.slow
def test_within_max_age_the_newest_and_each_pipelines_latest_stay(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    """The exact rule, at a `now` an hour after the first batch finished (max_age 1h)."""
    d = daemon_factory("cpus: 2\n").start()

    def one(name: str, pipeline: str) -> str:
        drop(spool, f"{name}.yaml", job(pipeline, "true"))
        return str(final_run(spool, f"incoming/{name}.yaml")["run_id"])

    old = [one(f"a{i}", f"a{i}") for i in range(4)] + [one(f"an{i}", "nightly") for i in range(3)]
    old_end = max(
        parse_rfc3339(str(r["finished_at"])).timestamp()
        for r in runs_of(spool)
        if r["run_id"] in old
    )
    wait_for("the clock past the first batch", lambda: time.time() > old_end + 0.05)
    young_nightly = [one(f"bn{i}", "nightly") for i in range(3)]
    young = [one(f"b{i}", f"b{i}") for i in range(3)]
    assert d.stop() == 0
    (spool / "queue" / f"{old[1]}.yaml").write_text("held")  # accepted, not done: resumes

    removed = retention.gc(
        Spool(spool, spool / "runs"),
        rules(keep_runs=2, max_age=HOUR),
        now=old_end + HOUR + 0.01,
        active={old[2]},
    )
    # Past max_age: every old run but the queued and the active one, links with them.
    # Within it: the newest two (b1, b2), and each pipeline's latest (b0, nightly's last).
    assert removed.runs == [old[0], old[3], *old[4:], *young_nightly[:2]]
    assert sorted(removed.links) == ["a0", "a3"]
    assert run_folders(spool) == sorted([old[1], old[2], young_nightly[2], *young])
    assert pipelines(spool) == {
        "a1": old[1],
        "a2": old[2],
        "b0": young[0],
        "b1": young[1],
        "b2": young[2],
        "nightly": young_nightly[2],
    }
    assert not removed.more


def test_sighup_applies_retention_at_once_to_runs_rejected_files_and_cache(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("cpus: 2\n").start()
    for name in ("one", "two", "three"):
        drop(spool, f"{name}.yaml", job(name, "true"))
        final_run(spool, f"incoming/{name}.yaml")
    drop(spool, "old-bad.yaml", "apiVersion: chute/v1\nkind: Nope\n")
    drop(spool, "new-bad.yaml", "apiVersion: chute/v1\nkind: Nope\n")
    rejected = spool / "rejected"
    wait_for("two rejections", lambda: len(list(rejected.glob("*.error.json"))) == 2)
    drop(spool, "stale.yaml", cache_job("stale", "s"))
    final_run(spool, "incoming/stale.yaml")
    drop(spool, "fresh.yaml", cache_job("fresh", "f"))
    newest = final_run(spool, "incoming/fresh.yaml")["run_id"]
    [stale, fresh] = [
        load_json(spool / "runs" / r["run_id"] / "manifest.json")["stages"][0]["cache"]["key"]
        for r in runs_of(spool)
        if r["pipeline"] in ("stale", "fresh")
    ]
    age(spool / "cache" / stale, 2 * HOUR)
    age(rejected / "old-bad.yaml.error.json", 2 * 86400)
    wait_for("no queue file", lambda: queue_empty(spool))

    d.config.write_text(
        "cpus: 2\nhttp: {listen: 127.0.0.1:0}\n"
        "retention: {keep_runs: 0, max_age: 0s, rejected_max_age: 1d, cache_max_age: 1h}\n"
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    line = (
        "retention removed 4 run folder(s), 4 pipeline link(s), 1 rejected file(s), 1 cache entry"
    )
    wait_for("the retention line", lambda: line in d.log.read_text(), 15)
    assert run_folders(spool) == [newest]
    assert pipelines(spool) == {"fresh": newest}
    assert sorted(os.listdir(rejected)) == ["new-bad.yaml", "new-bad.yaml.error.json"]
    assert sorted(os.listdir(spool / "cache")) == [fresh]
    assert d.stop() == 0


def test_gc_sweeps_links_to_runs_removed_by_hand_and_empty_pipeline_folders(
    spool: Path, chute: Chute, write_spec: Callable[[str, str], Path]
) -> None:
    for name in ("gone", "kept"):
        assert chute("run", str(write_spec(f"{name}.yaml", job(name, "true")))).code == 0
    [gone, kept] = run_folders(spool)
    subprocess.run(["rm", "-rf", str(spool / "runs" / gone)], check=True)
    (spool / "pipelines" / "empty").mkdir()
    done = chute("gc")
    assert done.out.splitlines()[1] == "removed 1 pipeline latest link(s) to removed runs"
    assert pipelines(spool) == {"kept": kept}


def test_gc_never_removes_a_running_or_queued_run(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 2\n").start()
    drop(spool, "gated.yaml", job("gated", f"until test -e {gate}; do sleep 0.05; done"))
    wait_for("the gated run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
    drop(spool, "wide.yaml", job("wide", "true", "  cpus: 2\n"))  # waits for the gated core
    for name in ("x", "y"):
        drop(spool, f"{name}.yaml", job(name, "true"))
        final_run(spool, f"incoming/{name}.yaml")
    wait_for("only two queue files", lambda: len(list((spool / "queue").glob("*.yaml"))) == 2)
    by_name = {r["pipeline"]: r for r in runs_of(spool)}
    assert (by_name["gated"]["state"], by_name["wide"]["state"]) == ("running", "queued")

    config = gc_config(tmp_path, "{keep_runs: 0, max_age: 0s}")
    done = chute("gc", "--config", str(config))
    assert done.out.startswith("removed 1 run(s)")  # x; y is runs/latest
    assert run_folders(spool) == sorted(
        r["run_id"] for r in by_name.values() if r["pipeline"] != "x"
    )

    gate.touch()
    final_run(spool, "incoming/wide.yaml")
    wait_for("no queue file", lambda: queue_empty(spool))
    assert chute("gc", "--config", str(config)).out.startswith("removed 2 run(s)")
    assert run_folders(spool) == [by_name["y"]["run_id"]]
    assert d.stop() == 0


@pytest.mark.slow
def test_cache_beyond_its_size_loses_the_least_recently_used_entries_first(
    spool: Path, chute: Chute, write_spec: Callable[[str, str], Path], tmp_path: Path
) -> None:
    keys = {}
    for fill in "abcd":
        spec = write_spec(f"{fill}.yaml", cache_job(f"fill-{fill}", fill, 300_000))
        assert chute("run", str(spec)).code == 0
        stage = load_json(spool / "runs" / "latest" / "manifest.json")["stages"][0]
        keys[fill] = stage["cache"]["key"]
    for fill, hours in zip("abc", (4, 2, 3), strict=True):  # d was just written
        age(spool / "cache" / keys[fill], hours * HOUR)

    done = chute("gc", "--config", str(gc_config(tmp_path, "{cache_max_size: 950KiB}")))
    assert done.out.splitlines()[3] == (
        "removed 1 cache entry (cache_max_age 30d, cache_max_size 950KiB)"
    )
    assert sorted(os.listdir(spool / "cache")) == sorted(keys[f] for f in "bcd")

    # Used again: a hit makes an entry the most recently used.
    assert chute("run", str(tmp_path / "c.yaml")).code == 0
    assert load_json(spool / "runs" / "latest" / "manifest.json")["stages"][0]["state"] == "cached"
    done = chute("gc", "--config", str(gc_config(tmp_path, "{cache_max_size: 0B}")))
    assert done.out.splitlines()[3].startswith("removed 1 cache entry")  # b; c and d are fresh
    assert sorted(os.listdir(spool / "cache")) == sorted(keys[f] for f in "cd")


def test_a_cache_entry_written_again_is_measured_again(spool: Path) -> None:
    """The daemon keeps each idle entry's size between passes, until its folder changes."""
    cache = spool / "cache"
    for key in ("a" * 64, "b" * 64):
        (cache / key).mkdir(parents=True)
        (cache / key / "output.json").write_bytes(b"x" * 100_000)
        age(cache / key, 3 * HOUR)
    s = Spool(spool, spool / "runs")
    sizes: dict[str, tuple[int, int]] = {}
    bound = rules(cache_max_size=400_000)
    assert retention.gc(s, bound, now=time.time(), sizes=sizes).cache == []
    assert sorted(sizes) == ["a" * 64, "b" * 64]
    (cache / ("b" * 64) / "more").write_bytes(b"y" * 400_000)
    age(cache / ("b" * 64), 2 * HOUR)  # written again (an hour after a), then idle
    assert retention.gc(s, bound, now=time.time(), sizes=sizes).cache == ["a" * 64, "b" * 64]
    assert sizes == {}
    assert os.listdir(cache) == []


def test_a_cache_hit_keeps_an_old_entry_from_its_max_age(
    spool: Path, chute: Chute, write_spec: Callable[[str, str], Path], tmp_path: Path
) -> None:
    spec = write_spec("memo.yaml", cache_job("memo", "m"))
    assert chute("run", str(spec)).code == 0
    [key] = os.listdir(spool / "cache")
    age(spool / "cache" / key, 3 * HOUR)
    config = gc_config(tmp_path, "{cache_max_age: 2h}")
    assert chute("run", str(spec)).code == 0  # a hit
    assert chute("gc", "--config", str(config)).out.splitlines()[3].startswith("removed 0 cache")
    assert os.listdir(spool / "cache") == [key]
    age(spool / "cache" / key, 3 * HOUR)
    assert chute("gc", "--config", str(config)).out.splitlines()[3].startswith("removed 1 cache")
    assert os.listdir(spool / "cache") == []


def test_a_pass_shares_its_limit_between_runs_rejected_files_and_cache(
    spool: Path, chute: Chute, write_spec: Callable[[str, str], Path]
) -> None:
    for i in range(3):
        assert chute("run", str(write_spec(f"j{i}.yaml", cache_job(f"j{i}", str(i))))).code == 0
    rejected = spool / "rejected"
    for i in range(3):
        (rejected / f"r{i}.yaml").write_text("kind: Nope\n")
        (rejected / f"r{i}.yaml.error.json").write_text("{}")
        age(rejected / f"r{i}.yaml.error.json", (10 - i) * HOUR)
    for key in os.listdir(spool / "cache"):
        age(spool / "cache" / key, 2 * HOUR)
    s = Spool(spool, spool / "runs")
    everything = rules(keep_runs=0, max_age=0, rejected_max_age=0, cache_max_age=0)
    first = retention.gc(s, everything, now=time.time(), limit=4)
    assert (len(first.runs), first.rejected, len(first.cache), first.more) == (
        2,
        ["r0.yaml"],
        1,
        True,
    )
    rest = retention.gc(s, everything, now=time.time())
    assert (len(rest.runs), rest.rejected, len(rest.cache), rest.more) == (
        0,
        ["r1.yaml", "r2.yaml"],
        2,
        False,
    )
    assert os.listdir(rejected) == []
    assert os.listdir(spool / "cache") == []


@pytest.mark.parametrize(
    "point", ["gc.link_aside", "gc.renamed", "gc.rejected_file_removed", "gc.entry_renamed"]
)
@pytest.mark.slow
def test_a_gc_killed_at_any_point_is_finished_by_the_next(
    spool: Path, chute: Chute, write_spec: Callable[[str, str], Path], tmp_path: Path, point: str
) -> None:
    assert chute("run", str(write_spec("memo.yaml", cache_job("memo", "m")))).code == 0
    assert chute("run", str(write_spec("last.yaml", job("last", "true")))).code == 0
    [key] = os.listdir(spool / "cache")
    age(spool / "cache" / key, 2 * HOUR)
    (spool / "rejected" / "bad.yaml").write_text("kind: Nope\n")
    (spool / "rejected" / "bad.yaml.error.json").write_text("{}")
    age(spool / "rejected" / "bad.yaml.error.json", 2 * HOUR)
    last = os.readlink(spool / "runs" / "latest")
    config = gc_config(
        tmp_path, "{keep_runs: 0, max_age: 0s, rejected_max_age: 1h, cache_max_age: 1h}"
    )

    killed = chute("gc", "--config", str(config), env={"CHUTE_CRASH_AT": point})
    assert killed.code == -signal.SIGKILL
    done = chute("gc", "--config", str(config))
    assert (done.code, done.err) == (0, "")
    assert run_folders(spool) == [last]
    assert pipelines(spool) == {"last": last}
    assert os.listdir(spool / "rejected") == []
    assert os.listdir(spool / "cache") == []


@pytest.mark.slow
def test_the_daemon_drains_a_backlog_in_passes_of_fifty(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("cpus: 2\n").start()
    for i in range(121):
        drop(spool, f"once-{i:03d}.yaml", job(f"once-{i:03d}", "true"))
    wait_for("121 finished runs", lambda: len(finished(spool)) == 121, 90)
    wait_for("no queue file", lambda: queue_empty(spool))
    d.config.write_text("cpus: 2\nhttp: {listen: 127.0.0.1:0}\nretention: {max_age: 0s}\n")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for("one run folder left", lambda: len(run_folders(spool)) == 1, 60)
    lines = [line for line in d.log.read_text().splitlines() if "retention removed" in line]
    assert [line.split("retention removed ")[1].split(" ")[0] for line in lines] == [
        "50",
        "50",
        "20",
    ]
    assert lines[0].endswith("; more to remove")
    assert not lines[2].endswith("; more to remove")
    assert d.stop() == 0
