"""The run report: report.html from real `chute run` runs, rendered by a real headless Chromium,
and the terminal timeline of `chute show`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest

from chute.observe import report
from chute.observe.report import charts, timeline
from chute.observe.report import html as page_html
from conftest import Done, chute_env, load_json

CHROMIUM = Path("/usr/bin/chromium")
GREEN = (0x2E, 0x9D, 0x4A)  # assets.COLOURS["succeeded"]
RED = (0xD6, 0x2D, 0x2D)  # assets.COLOURS["failed"]

DEMO = """\
apiVersion: chute/v1
kind: Pipeline
metadata:
  name: demo
spec:
  workdir: {workdir}
  stages:
    - name: flaky
      run: 'echo x >> {counter}; test $(wc -l < {counter}) -ge 2'
      retries: {{max: 3, delay: 50ms}}
    - {{name: bad, run: "sleep 0.3; exit 3"}}
    - {{name: after_bad, dependsOn: [bad], run: "true"}}
    - name: fragile
      run: exit 2
      fallback: {{run: "echo '{{}}' > $CHUTE_OUTPUT"}}
    - {{name: fan, run: "sleep 0.2", shards: {{over: [x, y, z]}}}}
    - {{name: memo, cache: true, version: "1", run: "echo '{{\\"n\\": 1}}' > $CHUTE_OUTPUT"}}
    - {{name: evil, call: "evil:boom"}}
"""

# c is listed before b so that on a one-CPU node it still runs first: b, the slow one,
# is then the dependency of d that finished latest whatever the node's size.
DAG = """\
apiVersion: chute/v1
kind: Pipeline
metadata:
  name: dag
spec:
  stages:
    - {name: a, run: "sleep 0.2"}
    - {name: c, dependsOn: [a], run: "sleep 0.05"}
    - {name: b, dependsOn: [a], run: "sleep 1"}
    - {name: d, dependsOn: [b, c], run: "sleep 0.2"}
"""


@dataclass
class Runs:
    spool: Path
    first: Path  # demo: retried, failed + skipped, fallback, sharded, escaped error
    second: Path  # demo again: memo is a cache hit
    dag: Path  # a -> b -> d slow, a -> c fast
    show_out: str


def _chute(spool: Path, *args: str) -> Done:
    cmd = [sys.executable, "-m", "chute", *args, "--spool", str(spool)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=chute_env())
    return Done(p.returncode, p.stdout, p.stderr)


def _latest(spool: Path) -> Path:
    return (spool / "runs" / os.readlink(spool / "runs" / "latest")).resolve()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Three real runs made once for the module by `chute run` (each takes a second or two)."""
    tmp = tmp_path_factory.mktemp("report")
    spool = tmp / "spool"
    spool.mkdir()
    (tmp / "evil.py").write_text(
        "def boom():\n    raise RuntimeError('<script>alert(1)</script> & \"q\"')\n"
    )
    demo = tmp / "demo.yaml"
    demo.write_text(DEMO.format(workdir=tmp, counter=tmp / "count"))
    dag = tmp / "dag.yaml"
    dag.write_text(DAG)
    done = _chute(spool, "run", str(demo))
    assert done.code == 1, done.err
    first = _latest(spool)
    (tmp / "count").unlink()
    assert _chute(spool, "run", str(demo)).code == 1
    second = _latest(spool)
    assert _chute(spool, "run", str(dag)).code == 0
    dag_dir = _latest(spool)
    show = _chute(spool, "show", first.name)
    assert show.code == 0, show.err
    return Runs(spool=spool, first=first, second=second, dag=dag_dir, show_out=show.out)


# -- reading the page back ---------------------------------------------------------------------


class Page(HTMLParser):
    """The parts of report.html the tests look at."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.bars: dict[str, list[dict[str, str]]] = {}  # chart (aria-label) -> its bars
        self._chart = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "svg" and "aria-label" in a:
            self._chart = a["aria-label"]
        if tag == "rect" and "data-tip" in a:
            self.bars.setdefault(self._chart, []).append(a)

    def stage_bars(self, stage: str, chart: str = "timeline by stage") -> list[dict[str, str]]:
        head = f"stage {stage}\n"
        return [b for b in self.bars.get(chart, []) if b["data-tip"].startswith(head)]


def page(run_dir: Path) -> Page:
    p = Page()
    p.feed((run_dir / "report.html").read_text())
    p.close()
    return p


def state_of(bar: dict[str, str]) -> str:
    return next(c[2:] for c in bar["class"].split() if c.startswith("s-"))


# -- the page from real runs -------------------------------------------------------------------


@pytest.mark.slow
def test_chute_run_writes_a_report_that_fetches_nothing(runs: Runs) -> None:
    text = (runs.first / "report.html").read_text()
    for needle in ("http://", "https://", "//", "@import"):
        assert needle not in text
    assert text.count("url(") == text.count("url(#")
    p = page(runs.first)
    links = [
        (tag, k, v)
        for tag, attrs in p.tags
        for k, v in attrs.items()
        if k in ("src", "href", "xlink:href", "action", "formaction", "poster", "data")
    ]
    assert links, "the page has its in-page navigation"
    assert [x for x in links if not x[2].startswith("#")] == []
    assert {t for t, _ in p.tags} & {"link", "img", "iframe", "object", "embed"} == set()
    assert [t for t, _ in p.tags].count("script") == 1


def test_user_strings_are_escaped(runs: Runs, tmp_path: Path) -> None:
    text = (runs.first / "report.html").read_text()
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;" in text
    (evil,) = page(runs.first).stage_bars("evil")
    assert "error RuntimeError: <script>alert(1)</script>" in evil["data-tip"]

    # Stage names are identifiers in a spec, but the page must not trust the manifest.
    run, stages = _hand_run(
        [_stage("<script>x()</script>", "failed", 0, 1, error="<img src=x onerror=y()>")]
    )
    out = page_html.render(run, stages)
    assert "<script>x()" not in out
    assert "<img" not in out
    assert "&lt;script&gt;x()&lt;/script&gt;" in out
    assert "&lt;img src=x onerror=y()&gt;" in out


def test_retried_stage_shows_each_attempt_as_its_own_segment(runs: Runs) -> None:
    bars = page(runs.first).stage_bars("flaky")
    assert [state_of(b) for b in bars] == ["failed", "succeeded"]
    assert "attempt 1 of 2" in bars[0]["data-tip"]
    assert "exit code 1" in bars[0]["data-tip"]
    assert "attempt 2 of 2" in bars[1]["data-tip"]
    assert float(bars[0]["x"]) < float(bars[1]["x"])


def test_failed_stage_is_red_and_its_dependent_hatched_as_skipped(runs: Runs) -> None:
    p = page(runs.first)
    (bad,) = p.stage_bars("bad")
    assert state_of(bad) == "failed"
    assert "error exited with code 3" in bad["data-tip"]
    (skipped,) = p.stage_bars("after_bad")
    assert state_of(skipped) == "skipped"
    assert "never started: a dependency failed" in skipped["data-tip"]
    assert ".s-skipped{fill:url(#hatch)" in (runs.first / "report.html").read_text()


def test_fallback_follows_the_failed_attempt(runs: Runs) -> None:
    bars = page(runs.first).stage_bars("fragile")
    assert [state_of(b) for b in bars] == ["failed", "fallback"]
    assert "fallback after attempt 1" in bars[1]["data-tip"]


def test_cache_hit_on_the_second_run_is_drawn_as_cached(runs: Runs) -> None:
    assert [state_of(b) for b in page(runs.first).stage_bars("memo")] == ["succeeded"]
    assert [state_of(b) for b in page(runs.second).stage_bars("memo")] == ["cached"]


def test_sharded_stage_has_a_row_per_shard_and_shards_sit_on_their_cores(runs: Runs) -> None:
    p = page(runs.first)
    manifest = {s["name"]: s for s in load_json(runs.first / "manifest.json")["stages"]}
    for sh in manifest["fan"]["shards"]:
        (bar,) = p.stage_bars(f"fan shard {sh['index']}")
        assert state_of(bar) == "succeeded"
        cpulist = ",".join(str(c) for c in sh["cores"])
        assert f"cores {cpulist}" in bar["data-tip"]
        on_cores = p.stage_bars(f"fan shard {sh['index']}", chart="timeline by core")
        assert len(on_cores) == len(sh["cores"])
    (envelope,) = p.stage_bars("fan")
    assert "envelope" in envelope["class"]


def test_critical_path_is_the_chain_of_latest_finishing_dependencies(runs: Runs) -> None:
    p = page(runs.dag)
    text = (runs.dag / "report.html").read_text()
    assert "critical path: <b>a</b> → <b>b</b> → <b>d</b>" in text
    outlined = {
        b["data-tip"].split("\n")[0].removeprefix("stage ")
        for b in p.bars["timeline by stage"]
        if "crit" in b["class"].split()
    }
    assert outlined == {"a", "b", "d"}


def test_show_prints_the_timeline_and_points_at_the_report(runs: Runs) -> None:
    out = runs.show_out
    assert f"report: {runs.first / 'report.html'}\n" in out
    timeline = out[out.index("timeline: ") :]
    names = [line.split()[0] for line in timeline.splitlines()[1:-1]]
    assert names == ["flaky", "bad", "after_bad", "fragile", "fan", "memo", "evil"]
    flaky = next(line for line in timeline.splitlines() if line.startswith("flaky "))
    bar = flaky.split("|")[1]
    assert bar.index("x") < bar.index("#")


MOVES = """\
apiVersion: chute/v1
kind: Pipeline
metadata: {name: moves}
spec:
  stages:
    - {name: hold, run: "sleep 0.3"}
    - name: main
      run: 'until test -e "$CHUTE_RUN_DIR/stages/hold/output.json"; do sleep 0.02; done; exit 1'
      fallback: {run: "true"}
"""


def test_a_fallback_on_another_core_is_recorded_shown_and_drawn_on_its_own_core(
    tmp_path: Path,
) -> None:
    """hold takes core 0 and main core 1; main fails once hold has ended, so its fallback
    gets core 0: each attempt keeps its own cores, and the stage's are its last attempt's."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (tmp_path / "moves.yaml").write_text(MOVES)
    (tmp_path / "chute.yaml").write_text('cpus: "0-1"\n')
    done = _chute(
        spool, "run", str(tmp_path / "moves.yaml"), "--config", str(tmp_path / "chute.yaml")
    )
    assert done.code == 0, done.err
    run_dir = _latest(spool)
    main = {s["name"]: s for s in load_json(run_dir / "manifest.json")["stages"]}["main"]
    assert main["state"] == "fallback"
    assert main["cpus"] == 1
    assert [(a.get("fallback", False), a["cores"]) for a in main["attempts"]] == [
        (False, [1]),
        (True, [0]),
    ]
    assert main["cores"] == [0]
    row = next(line.split() for line in done.out.splitlines() if line.startswith("main "))
    assert row[:2] == ["main", "fallback"]
    assert row[-1] == "0"  # the CORES column
    on_cores = page(run_dir).stage_bars("main", chart="timeline by core")
    assert [(state_of(b), b["data-tip"].splitlines()[-1]) for b in on_cores] == [
        ("fallback", "cores 0"),
        ("failed", "cores 1"),
    ]


# -- hand-made runs: the pure parts and the odd shapes -----------------------------------------


def _ts(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"2026-11-22T10:{ms // 60000:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}Z"


def _attempt(n: int, start: float, end: float, code: int = 0, **kw: Any) -> dict[str, Any]:
    error = None if code == 0 else f"exited with code {code}"
    return {
        "attempt": n,
        "started_at": _ts(start),
        "finished_at": _ts(end),
        "exit_code": code,
        "signal": None,
        "error": kw.pop("error", error),
        **kw,
    }


def _stage(
    name: str,
    state: str,
    start: float | None,
    end: float,
    deps: tuple[str, ...] = (),
    attempts: list[dict[str, Any]] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    if attempts is None:
        code = 0 if state == "succeeded" else 1
        attempts = [] if start is None else [_attempt(1, start, end, code, error=error)]
    return {
        "name": name,
        "state": state,
        "dependsOn": list(deps),
        "cpus": 1,
        "cores": [] if start is None else [2, 3],
        "started_at": None if start is None else _ts(start),
        "finished_at": _ts(end),
        "duration_seconds": None if start is None else end - start,
        "attempts": attempts,
        "cache": None,
        "output": None,
        "log": None,
        "shards": [],
    }


def _hand_run(
    stages: list[dict[str, Any]] | None, *, state: str = "failed", end: float | None = 4.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = {
        "run_id": "20261122_100000_abc123",
        "pipeline": "tiny",
        "kind": "Pipeline",
        "state": state,
        "trigger": {"type": "run", "source": "/srv/tiny.yaml"},
        "submitted_by": {"uid": 1000, "user": "alice"},
        "spec_sha256": "0" * 64,
        "created_at": _ts(0),
        "started_at": None if stages is None else _ts(0),
        "finished_at": None if end is None else _ts(end),
        "duration_seconds": end,
        "resumed_from": None,
        "host": "node-17",
        "chute_version": "0.1.0",
        "error": None,
    }
    return run, stages or []


def _write(folder: Path, run: dict[str, Any], stages: list[dict[str, Any]] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_bytes(orjson.dumps(run))
    if stages is not None:
        doc = {"run_id": run["run_id"], "pipeline": run["pipeline"], "stages": stages}
        (folder / "manifest.json").write_bytes(orjson.dumps(doc))
    return folder


TINY = [
    _stage("load", "succeeded", 0.0, 1.0),
    _stage(
        "transform",
        "succeeded",
        1.0,
        3.0,
        deps=("load",),
        attempts=[_attempt(1, 1.0, 1.5, 1), _attempt(2, 2.0, 3.0)],
    ),
    _stage("publish", "skipped", None, 3.0, deps=("transform",)),
    _stage("notify", "failed", 3.0, 4.0),
]


def test_text_timeline_places_each_attempt_on_the_time_axis(tmp_path: Path) -> None:
    run, stages = _hand_run(TINY)
    folder = _write(tmp_path / "run", run, stages)
    assert report.text_timeline(folder, width=8) == (
        "timeline: 4.00s from the first start, one char 0.50s; # ok, x failed, ~ other\n"
        "load      |##      | 1.00s\n"
        "transform |  x ##  | 2.00s\n"
        "publish   |        | -\n"
        "notify    |      xx| 1.00s"
    )


def test_text_timeline_is_empty_for_a_queued_run(tmp_path: Path) -> None:
    run, _ = _hand_run(None, state="queued", end=None)
    assert report.text_timeline(_write(tmp_path / "run", run, None)) == ""


def test_critical_path_walks_back_through_the_latest_dependency() -> None:
    run, stages = _hand_run(
        [
            _stage("a", "succeeded", 0, 1),
            _stage("b", "succeeded", 1, 5, deps=("a",)),
            _stage("c", "succeeded", 1, 2, deps=("a",)),
            _stage("side", "succeeded", 0, 3),
            _stage("d", "succeeded", 5, 6, deps=("b", "c")),
        ],
        end=6,
    )
    assert timeline.build_timeline(run, stages).critical == ("a", "b", "d")


ODD_SHAPES = {
    "queued": _hand_run(None, state="queued", end=None),
    "zero_length": _hand_run([_stage("only", "succeeded", 0, 0)], state="succeeded", end=0),
    "never_started": _hand_run(
        [_stage("bad", "failed", 0, 1), _stage("later", "skipped", None, 1, deps=("bad",))],
        end=1,
    ),
    "two_hundred": _hand_run(
        [
            _stage(
                f"s{i:03d}", "succeeded", i * 0.5, i * 0.5 + 3, deps=(f"s{i - 1:03d}",) if i else ()
            )
            for i in range(200)
        ],
        state="succeeded",
        end=200 * 0.5 + 3,
    ),
}


@pytest.fixture(params=sorted(ODD_SHAPES), ids=sorted(ODD_SHAPES))
def odd_run(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    run, stages = ODD_SHAPES[request.param]
    folder = _write(tmp_path / request.param, run, stages if request.param != "queued" else None)
    report.write_report(folder)
    return folder


def test_odd_runs_render_every_row(odd_run: Path) -> None:
    p = page(odd_run)
    text = (odd_run / "report.html").read_text()
    if odd_run.name == "queued":
        assert "No stage is known yet: the run is queued and has no manifest." in text
        assert p.bars == {}
        return
    stages = load_json(odd_run / "manifest.json")["stages"]
    drawn = {b["data-tip"].split("\n")[0] for b in p.bars["timeline by stage"]}
    assert drawn == {f"stage {s['name']}" for s in stages}
    for bar in p.bars["timeline by stage"]:
        assert float(bar["width"]) >= charts.MIN_BAR_W


def test_a_report_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "20261122_100000_abc123"
    folder.mkdir()
    (folder / "run.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="chute.observe.report"):
        assert report.write_report_or_log(folder) is None
    (rec,) = caplog.records
    assert rec.getMessage() == (
        f"20261122_100000_abc123 report: could not write {folder / 'report.html'}"
    )
    assert rec.exc_info is not None
    assert not (folder / "report.html").exists()


# -- a real browser ----------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is not installed (.ci/run installs Debian's chromium package)",
)


def chromium(tmp: Path, *args: str) -> str:
    """Run headless Chromium in its own process group; end the whole group on timeout."""
    profile = tmp / "profile"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={profile}",
        *args,
    ]
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"chromium did not finish within 60 s: {' '.join(cmd)}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # helpers (zygote, crashpad) go with it
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)
    assert p.returncode == 0, err[-2000:]
    return out


def body_of(dom: str) -> dict[str, str]:
    p = Page()
    p.feed(dom)
    p.close()
    (body,) = [attrs for tag, attrs in p.tags if tag == "body"]
    return body


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """Width, height, channels and raw pixels of an 8-bit RGB/RGBA non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    width = height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, interlace) == (8, 0), f"depth {depth}, interlace {interlace}"
            assert colour in (2, 6), f"colour type {colour}: only RGB (2) and RGBA (6)"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind_ = raw[start]
        row = bytearray(raw[start + 1 : start + 1 + stride])
        if kind_ == 1:  # Sub
            for i in range(channels, stride):
                row[i] = (row[i] + row[i - channels]) & 0xFF
        elif kind_ == 2:  # Up
            row = bytearray((a + b) & 0xFF for a, b in zip(row, prev, strict=True))
        elif kind_ == 3:  # Average
            for i in range(stride):
                left = row[i - channels] if i >= channels else 0
                row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind_ == 4:  # Paeth
            for i in range(stride):
                a = row[i - channels] if i >= channels else 0
                b = prev[i]
                c = prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                row[i] = (row[i] + pred) & 0xFF
        else:
            assert kind_ == 0, f"row {y}: unknown filter {kind_}"
        out += row
        prev = row
    return width, height, channels, bytes(out)


def count_colour(pixels: bytes, channels: int, rgb: tuple[int, int, int], tol: int = 8) -> int:
    r0, g0, b0 = rgb
    n = 0
    for i in range(0, len(pixels), channels):
        if (
            abs(pixels[i] - r0) <= tol
            and abs(pixels[i + 1] - g0) <= tol
            and abs(pixels[i + 2] - b0) <= tol
        ):
            n += 1
    return n


@needs_chromium
def test_chromium_draws_the_bars(runs: Runs, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    chromium(
        tmp_path,
        f"--screenshot={shot}",
        "--window-size=1400,900",
        (runs.first / "report.html").as_uri(),
    )
    width, height, channels, pixels = decode_png(shot.read_bytes())
    assert (width, height) == (1400, 900)
    # A 14 px bar one pixel long per ~1.5 ms of a ~1.5 s run: each drawn bar is hundreds of
    # pixels; a blank page or a script error has none of either colour.
    assert count_colour(pixels, channels, GREEN) > 2000
    assert count_colour(pixels, channels, RED) > 1000


@needs_chromium
@pytest.mark.parametrize("which", ["first", "dag"], ids=["demo_run", "dag_run"])
def test_chromium_runs_the_script_without_error(runs: Runs, tmp_path: Path, which: str) -> None:
    run_dir: Path = getattr(runs, which)
    dom = chromium(tmp_path, "--dump-dom", (run_dir / "report.html").as_uri())
    assert body_of(dom) == {"data-ready": "1"}  # set by the script; no data-error


@needs_chromium
@pytest.mark.slow
def test_chromium_renders_the_odd_runs(odd_run: Path, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", (odd_run / "report.html").as_uri())
    assert body_of(dom) == {"data-ready": "1"}  # set by the script; no data-error
