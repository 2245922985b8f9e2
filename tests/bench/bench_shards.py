"""Big sharded runs dropped at once: does the loop keep turning? (not part of the test suite)

    python tests/bench/bench_shards.py [--specs 20] [--shards 10000] [--seconds 60]
                                       [--count] [--stop-timeout 10]

Drops `--specs` Jobs at once, each `run: "true"` with `shards: {over: [a, a, ...]}` of
`--shards` items (`--count`: `shards: N` instead, a 100-byte file), into a fresh daemon
(`cpus: 2`) started with a fake NOTIFY_SOCKET and WATCHDOG_USEC=200ms, so the loop sends
WATCHDOG=1 every 0.1 s while it turns. For `--seconds` it records:
- the longest gap between WATCHDOG=1 pings (a gap is a loop turn that took that long);
- every /healthz answer that was not 200 (polled every 0.25 s, 2 s timeout);
- the daemon's peak RSS (psutil, every 0.25 s);
- shards finished per second (the daemon's `finished state=succeeded` log lines), over
  the whole window and over its last 20 s;
then sends SIGTERM and times the exit. Files the validator refuses end in rejected/; the
table says how many.
The package is byte-compiled first, as an install leaves it (benchenv.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchenv  # noqa: E402

MB = 1 << 20


def spec(name: str, shards: int, count: bool) -> bytes:
    over = f"{shards}" if count else "{over: [" + ",".join(["a"] * shards) + "]}"
    text = (
        f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
        f'spec:\n  run: "true"\n  shards: {over}\n'
    )
    return text.encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", type=int, default=20)
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--count", action="store_true", help="shards: N instead of over: [...]")
    ap.add_argument("--stop-timeout", type=float, default=10.0)
    ap.add_argument("--keep", action="store_true", help="leave the temp spool for a look")
    args = ap.parse_args()
    benchenv.prepare()
    benchenv.settle()

    tmp = Path(tempfile.mkdtemp(prefix="chute-bench-shards-"))
    spool = tmp / "spool"
    staging = tmp / "staging"
    staging.mkdir()
    (tmp / "chute.yaml").write_text(
        f'cpus: 2\nhttp: {{listen: "127.0.0.1:0"}}\nstop_timeout: {args.stop_timeout:g}s\n'
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp / "notify.sock"))
    sock.settimeout(0.05)
    env = benchenv.env()
    env.update(NOTIFY_SOCKET=str(tmp / "notify.sock"), WATCHDOG_USEC="200000")
    env.pop("JOURNAL_STREAM", None)
    env.pop("WATCHDOG_PID", None)
    log_path = tmp / "daemon.log"
    log = open(log_path, "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "chute", "daemon", "--spool", str(spool)]
    cmd += ["--config", str(tmp / "chute.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    pings: list[float] = []
    messages: list[str] = []

    def receive(until: float) -> None:
        while time.monotonic() < until:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            for line in data.decode().splitlines():
                messages.append(line)
                if line == "WATCHDOG=1":
                    pings.append(now)

    deadline = time.monotonic() + 30
    while "READY=1" not in messages:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"daemon not ready:\n{log_path.read_text()[-3000:]}")
        receive(time.monotonic() + 0.1)
    status = spool / "state" / "status.json"
    while not status.exists():
        time.sleep(0.05)
    address = orjson.loads(status.read_bytes())["http"]

    for i in range(args.specs):
        (staging / f"big{i:02d}.yaml").write_bytes(spec(f"big{i:02d}", args.shards, args.count))
    size = (staging / "big00.yaml").stat().st_size
    daemon = psutil.Process(proc.pid)
    peak = daemon.memory_info().rss
    unhealthy: list[str] = []
    finished: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        done = 0
        offset = 0
        while not stop.is_set():
            peak = max(peak, daemon.memory_info().rss)
            try:
                with urllib.request.urlopen(f"http://{address}/healthz", timeout=2) as r:
                    r.read()
            except urllib.error.HTTPError as exc:
                unhealthy.append(f"{exc.code} {exc.read().decode().strip()}")
            except OSError as exc:
                unhealthy.append(f"no answer: {exc}")
            with open(log_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            offset += cut
            done += chunk[:cut].count(b"finished state=succeeded")
            finished.append((time.monotonic(), done))
            stop.wait(0.25)

    t0 = time.monotonic()
    for i in range(args.specs):
        os.rename(staging / f"big{i:02d}.yaml", spool / "incoming" / f"big{i:02d}.yaml")
    pings.append(t0)
    sampler = threading.Thread(target=sample)
    sampler.start()
    receive(t0 + args.seconds)
    before_stop = list(pings)
    stop.set()
    sampler.join()
    t_stop = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
        print("daemon ignored SIGTERM for 600 s; killed")
    exit_s = time.perf_counter() - t_stop
    receive(time.monotonic() + 0.2)
    log.close()

    gaps = [b - a for a, b in itertools.pairwise(before_stop)]
    worst = max(gaps, default=0.0)
    at_worst = before_stop[gaps.index(worst)] - t0 if gaps else 0.0
    rejected = len(list((spool / "rejected").glob("*.error.json")))
    total = finished[-1][1] if finished else 0
    rate_all = total / args.seconds
    tail = [(t, n) for t, n in finished if t >= finished[-1][0] - 20] if finished else []
    rate_tail = (tail[-1][1] - tail[0][1]) / max(tail[-1][0] - tail[0][0], 1e-9) if tail else 0
    print(
        f"{args.specs} specs x {args.shards} shards ({'count' if args.count else 'over'}, "
        f"{size / 1024:.0f} KiB each), {args.seconds:g} s, cpus 2"
    )
    print(f"  rejected files            {rejected}")
    print(f"  longest WATCHDOG gap      {worst:.2f} s (at +{at_worst:.1f} s)")
    print(
        f"  healthz not 200           {len(unhealthy)}"
        + (f": {unhealthy[:3]}" if unhealthy else "")
    )
    print(f"  peak RSS                  {peak / MB:.0f} MiB")
    print(f"  shards finished           {total} ({rate_all:.0f}/s; last 20 s {rate_tail:.0f}/s)")
    print(f"  SIGTERM to exit           {exit_s:.1f} s (exit code {code})")
    if args.keep:
        print(f"  spool left in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
