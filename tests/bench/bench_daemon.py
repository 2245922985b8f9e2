"""The daemon end to end against its floor, measured in one run (not part of the test suite).

    python tests/bench/bench_daemon.py [--quick] [--repeat N] [--profile OUT.prof]

1. Intake latency: one drop every ~20 ms (500 one-stage `run: "true"` Jobs, `cpus: 2`);
   latency = the stage's `started_at` in manifest.json minus time.time() taken right after
   the os.rename into incoming/. The floor watches the same renames at the same time: a
   bare inotify reader (watchdog's inotify_c binding, os.read in a thread) that calls
   subprocess.Popen(["true"]) on each event. `started_at` has ms resolution (truncated),
   so chute's figures can read up to 1 ms low.
2. Burst throughput: start the clock, rename 1,000 one-stage `true` Jobs into incoming/
   as fast as possible, stop when every run is final; vs. `seq 1000 | xargs -P2 -n1 true`.
   "Final" is polled cheaply (incoming/, state/intake/ and queue/ all empty: the daemon
   removes a queue file only after the run's final run.json is durable), then every
   run.json is read and must say succeeded. Twice: with the spool on the root filesystem
   (`sync: auto` picks an fsync per file and folder there), and on a fresh filesystem of
   its own with `sync: syncfs` (ownfs.py: a loop-mounted ext4 on the same disk; skipped,
   with the reason, where the machine cannot mount one).
3. RSS of the daemon process: idle after READY=1, then with 10,000 files queued
   (`cpus: 1`, Jobs `run: "sleep 1"`), read once incoming/ is empty or queue/ holds them
   all; then SIGTERM (`stop_timeout: 1s`), which leaves the runs interrupted.

The package is byte-compiled first, as an install leaves it (benchenv.py).
Drops are written as `.<name>.tmp` in a staging folder beside the spool (same filesystem)
and renamed into incoming/, so the clock covers renames only and the daemon sees one
IN_MOVED_TO per drop. Every measurement gets a fresh temp spool and its own daemon;
`--repeat` runs each one N times and the table gives the best and the spread.
`--profile OUT` instead runs one burst with the daemon under cProfile and prints the top
functions by tottime and cumtime.
"""

from __future__ import annotations

import argparse
import os
import pstats
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
import psutil
from watchdog.observers.inotify_c import InotifyConstants, inotify_add_watch, inotify_init

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "daemon"))

import benchenv  # noqa: E402
import ownfs  # noqa: E402

from chute.daemon import MAX_ACTIVE_RUNS  # noqa: E402  (the daemon's backpressure limit)

MB = 1 << 20
HTTP = 'http: {listen: "127.0.0.1:0"}\n'  # any free port: never clash with another daemon


def job_yaml(name: str, run: str) -> bytes:
    return (
        f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  run: {run!r}\n"
    ).encode()


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


class Daemon:
    """`chute daemon` on a fresh temp spool, ready once READY=1 arrives on NOTIFY_SOCKET."""

    def __init__(self, config: str, prefix: tuple[str, ...] = (), root: Path | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="chute-bench-", dir=root))
        self.spool = self.tmp / "spool"
        self.stage = self.tmp / "stage"  # drops are written here, then renamed in
        self.stage.mkdir()
        (self.tmp / "chute.yaml").write_text(config)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.tmp / "notify.sock"))
        env = benchenv.env()
        env["NOTIFY_SOCKET"] = str(self.tmp / "notify.sock")
        env.pop("JOURNAL_STREAM", None)
        cmd = [sys.executable, *prefix, "-m", "chute", "daemon"]
        cmd += ["--spool", str(self.spool), "--config", str(self.tmp / "chute.yaml")]
        self.log = open(self.tmp / "daemon.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log)
        self.pid = self.proc.pid
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            self.sock.settimeout(0.1)
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return
            except TimeoutError:
                continue
        raise SystemExit(f"no READY=1 from the daemon in {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return (self.tmp / "daemon.log").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"

    def stage_drops(self, names: list[str], run: str) -> None:
        for name in names:
            (self.stage / f".{name}.tmp").write_bytes(job_yaml(name, run))

    def drop(self, name: str) -> float:
        os.rename(self.stage / f".{name}.tmp", self.spool / "incoming" / f"{name}.yaml")
        return time.time()

    def stop(self, timeout: float = 300.0) -> float:
        """SIGTERM, wait; returns the seconds the daemon took to exit."""
        t = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise SystemExit(f"daemon ignored SIGTERM for {timeout}s") from None
        return time.perf_counter() - t

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.log.close()
        LEFT.append(self.tmp)  # removed at the very end: see benchenv.settle()


LEFT: list[Path] = []  # temp spools of finished measurements


def cleanup() -> None:
    for tmp in LEFT:
        shutil.rmtree(tmp, ignore_errors=True)
    LEFT.clear()


@contextmanager
def daemon(config: str, prefix: tuple[str, ...] = (), root: Path | None = None) -> Iterator[Daemon]:
    benchenv.settle()
    d = Daemon(config, prefix, root)
    try:
        yield d
    finally:
        d.close()


def pending(spool: Path) -> int:
    """Drops not yet final: in incoming/, claimed in state/intake/, or still in queue/."""
    return sum(len(os.listdir(spool / f)) for f in ("incoming", "state/intake", "queue"))


def wait_final(spool: Path, n: int, timeout: float) -> tuple[float, list[Path]]:
    """Poll until all n runs are final and every run.json says succeeded; returns the
    time.perf_counter() when that was first seen, and the run folders."""
    deadline = time.monotonic() + timeout
    confirmed: set[Path] = set()
    while time.monotonic() < deadline:
        if pending(spool) == 0:
            seen = time.perf_counter()
            dirs = [p for p in (spool / "runs").iterdir() if p.name[0].isdigit()]
            for d in dirs:
                if d not in confirmed:
                    state = orjson.loads((d / "run.json").read_bytes())["state"]
                    if state != "succeeded":
                        raise SystemExit(f"{d.name} is {state}, not succeeded")
                    confirmed.add(d)
            if len(confirmed) >= n:
                return seen, dirs
        time.sleep(0.01)
    raise SystemExit(f"{n - len(confirmed)} of {n} runs not final after {timeout}s")


class InotifyFloor:
    """What intake could cost at least: inotify event → Popen(["true"]) in one thread."""

    def __init__(self, folder: Path) -> None:
        self.fd = inotify_init()
        if (
            self.fd < 0
            or inotify_add_watch(self.fd, os.fsencode(folder), InotifyConstants.IN_MOVED_TO) < 0
        ):
            raise OSError("inotify_init/inotify_add_watch failed")
        self.seen: dict[str, float] = {}  # name → time.time() once `true` was started
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            buf = os.read(self.fd, 1 << 16)
            pos = 0
            while pos < len(buf):
                length = int.from_bytes(buf[pos + 12 : pos + 16], sys.byteorder)
                name = buf[pos + 16 : pos + 16 + length].split(b"\0", 1)[0].decode()
                pos += 16 + length
                child = subprocess.Popen(["true"])
                self.seen[name] = time.time()
                child.wait()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Latency:
    p50: float
    p99: float
    floor_p50: float
    floor_p99: float


def measure_latency(drops: int, gap: float = 0.02) -> Latency:
    """Intake latency (ms) of chute and of the bare inotify + Popen floor, same renames."""
    with daemon("cpus: 2\n" + HTTP) as d:
        names = [f"lat-{i}" for i in range(drops)]
        d.stage_drops(names, "true")
        floor = InotifyFloor(d.spool / "incoming")
        renamed: dict[str, float] = {}
        start = time.monotonic()
        for i, name in enumerate(names):
            delay = start + i * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            renamed[name] = d.drop(name)
        _, dirs = wait_final(d.spool, drops, timeout=60 + drops * 0.1)
        floor.close()
        chute_ms = []
        for run_dir in dirs:
            source = orjson.loads((run_dir / "run.json").read_bytes())["trigger"]["source"]
            name = source.removeprefix("incoming/").removesuffix(".yaml")
            stage = orjson.loads((run_dir / "manifest.json").read_bytes())["stages"][0]
            chute_ms.append((epoch(stage["started_at"]) - renamed[name]) * 1000)
        floor_ms = [(floor.seen[f"{n}.yaml"] - renamed[n]) * 1000 for n in names]
        d.stop()
    return Latency(
        percentile(chute_ms, 0.5),
        percentile(chute_ms, 0.99),
        percentile(floor_ms, 0.5),
        percentile(floor_ms, 0.99),
    )


@dataclass
class Burst:
    seconds: float  # first rename → every run final
    first_start: float  # first rename → earliest stage started_at


def burst(jobs: int, prefix: tuple[str, ...] = (), own_fs: bool = False) -> Burst:
    """Rename `jobs` `true` Jobs in at once; time until all of them succeeded. `own_fs`:
    the spool on a fresh filesystem of its own, `sync: syncfs` (ownfs.py)."""
    if own_fs:
        with ownfs.own_filesystem() as mnt:
            return _burst(jobs, prefix, "sync: syncfs\n", mnt)
    return _burst(jobs, prefix, "", None)


def _burst(jobs: int, prefix: tuple[str, ...], config: str, root: Path | None) -> Burst:
    with daemon("cpus: 2\n" + HTTP + config, prefix, root) as d:
        names = [f"burst-{i}" for i in range(jobs)]
        d.stage_drops(names, "true")
        wall, t = time.time(), time.perf_counter()
        for name in names:
            d.drop(name)
        done, dirs = wait_final(d.spool, jobs, timeout=60 + jobs * 0.5)
        d.stop()
        first = min(
            epoch(orjson.loads((p / "manifest.json").read_bytes())["stages"][0]["started_at"])
            for p in dirs
        )
    return Burst(done - t, first - wall)


def xargs(jobs: int) -> float:
    benchenv.settle()
    t = time.perf_counter()
    subprocess.run(f"seq {jobs} | xargs -P2 -n1 true", shell=True, check=True)
    return time.perf_counter() - t


@dataclass
class Rss:
    idle: float  # MB
    queued: float  # MB
    queued_files: int  # in queue/ when read
    started: int  # runs no longer queued when read (cpus: 1, `sleep 1` each)
    intake_seconds: float  # first rename → incoming/ empty
    stop_seconds: float  # SIGTERM → exit


def _state(path: Path) -> str | None:
    """A run's state, or None for a folder still being made (no run.json yet)."""
    try:
        return str(orjson.loads(path.read_bytes())["state"])
    except FileNotFoundError:
        return None


def measure_rss(files: int) -> Rss:
    with daemon("cpus: 1\nstop_timeout: 1s\n" + HTTP) as d:
        proc = psutil.Process(d.pid)
        time.sleep(1.0)
        idle = proc.memory_info().rss / MB
        names = [f"rss-{i}" for i in range(files)]
        d.stage_drops(names, "sleep 1")
        t = time.perf_counter()
        for name in names:
            d.drop(name)
        incoming, queue = d.spool / "incoming", d.spool / "queue"
        deadline = time.monotonic() + 60 + files * 0.2
        # The daemon holds at most MAX_ACTIVE_RUNS; the rest wait in incoming/ (backpressure).
        want = min(files, MAX_ACTIVE_RUNS)
        while len(os.listdir(queue)) < want and os.listdir(incoming):
            if time.monotonic() > deadline:
                raise SystemExit(f"intake of {files} files did not finish:\n{d.log_text()}")
            time.sleep(0.1)
        intake = time.perf_counter() - t
        queued = proc.memory_info().rss / MB
        in_queue = len(os.listdir(queue))
        started = sum(
            _state(p / "run.json") not in ("queued", None)
            for p in (d.spool / "runs").iterdir()
            if p.name[0].isdigit()
        )
        stop = d.stop(timeout=600)
    return Rss(idle, queued, in_queue, started, intake, stop)


def span(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}" if len(values) > 1 else "—"


def table(
    lat: list[Latency],
    chute: list[Burst],
    own: list[Burst] | str,
    xargs_s: list[float],
    jobs: int,
    rss: list[Rss],
    files: int,
    n: int,
) -> str:
    p50 = [x.p50 for x in lat]
    p99 = [x.p99 for x in lat]
    f50 = [x.floor_p50 for x in lat]
    f99 = [x.floor_p99 for x in lat]
    x_rate = [jobs / s for s in xargs_s]
    idle = [r.idle for r in rss]
    queued = [r.queued for r in rss]
    rows = [
        (
            "Intake latency p50 (ms)",
            min(p50),
            span(p50),
            "inotify+Popen",
            min(f50),
            span(f50),
            min(p50) / min(f50),
            "≤ 10 ms",
            min(p50) <= 10,
        ),
        (
            "Intake latency p99 (ms)",
            min(p99),
            span(p99),
            "inotify+Popen",
            min(f99),
            span(f99),
            min(p99) / min(f99),
            "≤ 50 ms",
            min(p99) <= 50,
        ),
        _burst_row(f"Burst {jobs} jobs (jobs/s)", chute, jobs, x_rate),
        *_own_row(own, jobs, x_rate),
        ("RSS idle (MB)", min(idle), span(idle), "—", None, "", None, "≤ 60 MB", min(idle) <= 60),
        (
            f"RSS, {files} queued (MB)",
            min(queued),
            span(queued),
            "idle",
            min(idle),
            "",
            min(queued) / min(idle),
            "≤ 200 MB",
            min(queued) <= 200,
        ),
    ]
    out = [
        f"| measure (best of {n}) | chute | spread | reference | ref. | spread | "
        "chute/ref | target | met |",
        "|---|---:|---:|---|---:|---:|---:|---|:-:|",
    ]
    for name, best, sp, ref_name, ref, ref_sp, ratio, target, ok in rows:
        ref_txt = "—" if ref is None else f"{ref:.1f}"
        ratio_txt = "—" if ratio is None else f"{ratio:.2f}"
        out.append(
            f"| {name} | {best:.1f} | {sp} | {ref_name} | {ref_txt} | {ref_sp or '—'} | "
            f"{ratio_txt} | {target} | {'yes' if ok else '**no**'} |"
        )
    return "\n".join(out)


Row = tuple[str, float, str, str, float | None, str, float | None, str, bool]


def _burst_row(name: str, bursts: list[Burst], jobs: int, x_rate: list[float]) -> Row:
    rate = [jobs / b.seconds for b in bursts]
    ratio = max(rate) / max(x_rate)
    target = "≥ 0.30 of xargs"
    return (
        name,
        max(rate),
        span(rate, "{:.0f}"),
        "xargs -P2",
        max(x_rate),
        span(x_rate, "{:.0f}"),
        ratio,
        target,
        ratio >= 0.30,
    )


def _own_row(own: list[Burst] | str, jobs: int, x_rate: list[float]) -> list[Row]:
    if isinstance(own, str):
        print(f"(no own-filesystem burst: {own})")
        return []
    name = f"Burst {jobs} jobs, spool on its own fs, `sync: syncfs` (jobs/s)"
    return [_burst_row(name, own, jobs, x_rate)]


def profile(out: Path, jobs: int) -> None:
    seconds = burst(jobs, prefix=("-m", "cProfile", "-o", str(out))).seconds
    print(f"burst of {jobs} under cProfile: {seconds:.2f}s ({jobs / seconds:.0f} jobs/s)\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(str(out)).sort_stats(key).print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300-job burst, 2,000 files for RSS")
    ap.add_argument("--repeat", type=int, default=None, help="runs of each (default 3, quick 1)")
    ap.add_argument("--profile", type=Path, help="profile one burst into this file instead")
    args = ap.parse_args()
    benchenv.prepare()
    jobs, files = (300, 2000) if args.quick else (1000, 10_000)
    drops = 500
    n = args.repeat or (1 if args.quick else 3)
    try:
        if args.profile:
            profile(args.profile, jobs)
        else:
            measure_all(jobs, files, drops, n)
    finally:
        cleanup()


def measure_all(jobs: int, files: int, drops: int, n: int) -> None:
    load_before = os.getloadavg()
    lat: list[Latency] = []
    chute: list[Burst] = []
    own: list[Burst] = []
    why_not = ownfs.unavailable()
    xargs_s: list[float] = []
    for _ in range(n):  # interleaved, so a noisy minute hits every measure alike
        lat.append(measure_latency(drops))
        chute.append(burst(jobs))
        if why_not is None:
            own.append(burst(jobs, own_fs=True))
        xargs_s.append(xargs(jobs))
    rss = [measure_rss(files) for _ in range(n)]
    load_after = os.getloadavg()
    print(table(lat, chute, why_not or own, xargs_s, jobs, rss, files, n))
    print()
    for i, r in enumerate(rss, 1):
        print(
            f"RSS run {i}: idle {r.idle:.1f} MB, queued {r.queued:.1f} MB; intake of {files} "
            f"took {r.intake_seconds:.1f}s ({files / r.intake_seconds:.0f} files/s); when read: "
            f"{r.queued_files} in queue/, {r.started} run(s) started; "
            f"SIGTERM→exit {r.stop_seconds:.1f}s"
        )
    for i, (x, b, xs) in enumerate(zip(lat, chute, xargs_s, strict=True), 1):
        print(
            f"run {i}: latency p50/p99 {x.p50:.1f}/{x.p99:.1f} ms (floor "
            f"{x.floor_p50:.1f}/{x.floor_p99:.1f}); burst {b.seconds:.2f}s, first stage "
            f"started {b.first_start:.2f}s after the first rename; xargs {xs:.2f}s"
        )
    print(
        f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.2f}' for x in load_after)}"
    )


if __name__ == "__main__":
    main()
