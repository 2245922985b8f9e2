"""A run never needs another run's folder: a cache hit and a retry's kept stage get their own
copies of the stage's files, and the paths in their outputs name them (engine/cache.py,
outputs.relocate, engine/copies.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chute.store.outputs import relocate
from conftest import Chute, load_json
from daemon_proc import Daemon, assert_settled, daemon_factory, drop, final_run

__all__ = ["daemon_factory"]  # a fixture, used by name

CONFIG = "cpus: 2\nretention: {keep_runs: 1, max_age: 30d}\n"

# render makes a file and passes its absolute path on; tiles does the same per shard; show
# reads every path it is given and records what it read.
RENDER = """\
set -e
echo render >> {counter}
echo pixels > "$CHUTE_ARTIFACTS/pic.txt"
printf '{{"pic": "%s"}}' "$CHUTE_ARTIFACTS/pic.txt" > "$CHUTE_OUTPUT"
"""
TILES = """\
set -e
mkdir -p "$CHUTE_ARTIFACTS/deep"
echo "tile $CHUTE_SHARD_INDEX" > "$CHUTE_ARTIFACTS/deep/tile.txt"
printf '{"tile": "%s"}' "$CHUTE_ARTIFACTS/deep/tile.txt" > "$CHUTE_OUTPUT"
"""
SHOW = """\
import json, os
up = json.load(open(os.environ["CHUTE_INPUTS"]))["upstream"]
paths = [up["render"]["pic"]] + [t["tile"] for t in up["tiles"]]
read = {p: open(p).read() for p in paths}
json.dump({"read": read}, open(os.environ["CHUTE_OUTPUT"], "w"))
"""


def _pipeline(tmp_path: Path, check: str = "") -> str:
    (tmp_path / "render.sh").write_text(RENDER.format(counter=tmp_path / "count"))
    (tmp_path / "tiles.sh").write_text(TILES)
    (tmp_path / "show.py").write_text(SHOW)
    return (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: pics}\nspec:\n  stages:\n"
        f"    - {{name: render, cache: true, run: 'sh {tmp_path}/render.sh'}}\n"
        f"    - {{name: tiles, cache: true, shards: 2, run: 'sh {tmp_path}/tiles.sh'}}\n"
        "    - {name: show, dependsOn: [render, tiles],"
        f" run: '{check}python3 {tmp_path}/show.py'}}\n"
    )


def _stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in load_json(run_dir / "manifest.json")["stages"]}


def _read_by_show(run_dir: Path) -> dict[str, str]:
    data: dict[str, str] = load_json(run_dir / "stages" / "show" / "output.json")["data"]["read"]
    return data


def _ran(spool: Path, name: str, text: str) -> Path:
    """Drop `text` as `name`, wait for its run to succeed with settled records; its folder."""
    drop(spool, name, text)
    rec = final_run(spool, f"incoming/{name}")
    run_dir = spool / "runs" / rec["run_id"]
    assert rec["state"] == "succeeded", (rec, (run_dir / "stages" / "show" / "log").read_text())
    assert_settled(run_dir)
    return run_dir


def _own_files(run_dir: Path) -> dict[str, str]:
    """What show read, each path checked to be inside `run_dir` (and to exist there now)."""
    read = _read_by_show(run_dir)
    for path in read:
        assert path.startswith(f"{run_dir}/stages/"), path
        assert Path(path).is_file(), path
    return read


def test_a_cache_hit_keeps_working_after_retention_removes_the_run_that_made_the_entry(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    text = _pipeline(tmp_path)
    d = daemon_factory(CONFIG).start()
    first = _ran(spool, "p1.yaml", text)
    expected = {"pixels\n", "tile 0\n", "tile 1\n"}
    assert set(_own_files(first).values()) == expected
    second = _ran(spool, "p2.yaml", text)
    assert {n: s["state"] for n, s in _stages(second).items()} == {
        "render": "cached",
        "tiles": "cached",
        "show": "succeeded",
    }
    assert set(_own_files(second).values()) == expected
    out = load_json(second / "stages" / "render" / "output.json")
    assert out["data"] == {"pic": f"{second}/stages/render/artifacts/pic.txt"}
    assert out["artifacts"] == [
        {"name": "pic.txt", "path": "artifacts/pic.txt", "type": "text/plain"}
    ]
    gc = chute("gc", "--config", str(d.config))
    assert gc.code == 0, gc.err
    assert not first.exists()
    third = _ran(spool, "p3.yaml", text)
    assert _stages(third)["render"]["state"] == "cached"
    assert set(_own_files(third).values()) == expected
    assert (tmp_path / "count").read_text() == "render\n"  # made once, used three times
    key = _stages(third)["render"]["cache"]["key"]
    assert (spool / "cache" / key / "files" / "artifacts" / "pic.txt").read_text() == "pixels\n"
    assert d.stop() == 0


def test_a_cache_entry_whose_files_are_gone_is_a_miss_and_is_made_again(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    text = _pipeline(tmp_path)
    d = daemon_factory(CONFIG).start()
    first = _ran(spool, "p1.yaml", text)
    key = _stages(first)["render"]["cache"]["key"]
    kept = spool / "cache" / key / "files" / "artifacts" / "pic.txt"
    assert kept.stat().st_mode & 0o222 == 0  # shared by hard link: read-only
    kept.unlink()
    second = _ran(spool, "p2.yaml", text)
    stages = _stages(second)
    assert (stages["render"]["state"], stages["tiles"]["state"]) == ("succeeded", "cached")
    assert set(_own_files(second).values()) == {"pixels\n", "tile 0\n", "tile 1\n"}
    assert (tmp_path / "count").read_text() == "render\nrender\n"
    assert (
        f"{second.name} cache entry {key} lacks its file artifacts/pic.txt (No such file or "
        "directory); running the stage"
    ) in d.log.read_text()
    assert kept.read_text() == "pixels\n"  # made again, whole
    third = _ran(spool, "p3.yaml", text)
    assert _stages(third)["render"]["state"] == "cached"
    assert d.stop() == 0


@pytest.mark.slow
def test_a_retried_run_names_its_own_copies_and_outlives_the_run_it_retried(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    text = _pipeline(tmp_path, check=f"test -e {gate} && ")
    d = daemon_factory(CONFIG).start()
    drop(spool, "p1.yaml", text)
    first = spool / "runs" / final_run(spool, "incoming/p1.yaml")["run_id"]
    assert assert_settled(first)["state"] == "failed"
    gate.touch()
    done = chute("retry", first.name, "--wait")
    assert done.code == 0, done.out + done.err
    second = spool / "runs" / load_json(spool / "runs" / "latest" / "run.json")["run_id"]
    assert assert_settled(second)["resumed_from"] == first.name
    assert set(_own_files(second).values()) == {"pixels\n", "tile 0\n", "tile 1\n"}
    for stage in ("render", "tiles"):
        data = load_json(second / "stages" / stage / "output.json")["data"]
        assert first.name not in str(data)
        assert second.name in str(data)
    gc = chute("gc", "--config", str(d.config))
    assert gc.code == 0, gc.err
    assert not first.exists()
    done = chute("retry", second.name, "--from", "show", "--wait")
    assert done.code == 0, done.out + done.err
    third = spool / "runs" / load_json(spool / "runs" / "latest" / "run.json")["run_id"]
    assert third != second
    assert assert_settled(third)["resumed_from"] == second.name
    assert set(_own_files(third).values()) == {"pixels\n", "tile 0\n", "tile 1\n"}
    assert (tmp_path / "count").read_text() == "render\n"
    assert d.stop() == 0


def test_relocate_moves_each_path_inside_the_old_run_folder_and_nothing_else() -> None:
    old, real, new = (
        "/s/runs/20261122_101500_a1b2c3",
        "/real/runs/20261122_101500_a1b2c3",
        "/s/runs/N",
    )
    data = {
        "pic": f"{old}/stages/a/artifacts/p.png",
        "real": f"{real}/stages/a/x",
        "cmd": f"cat {old}/stages/a/x {old}x",  # a path inside a string; a longer name is not
        "folder": old,
        f"{old}/k": [old + "/", 3, None, {"n": "/s/runs/other/x"}],
    }
    assert relocate(data, (old, real), new) == {
        "pic": f"{new}/stages/a/artifacts/p.png",
        "real": f"{new}/stages/a/x",
        "cmd": f"cat {new}/stages/a/x {old}x",
        "folder": new,
        f"{new}/k": [new + "/", 3, None, {"n": "/s/runs/other/x"}],
    }
    assert relocate(data, (new,), new) is data
