"""What the kill -9 storm and the soak share: the ledger their tasks write, the pipelines and
schedules that write it, the operations a user makes (drops, cancels, retries, gc,
unschedules) with what each acknowledged, a watcher of runs/, the daemon's life (kill -9,
crash points, restarts, SIGHUP), and the checks made at the end.

The promise checked: after the last restart every acknowledged request has happened exactly
once (a drop is one run or one rejection; a retry whose id the CLI printed is that run, once,
final; a cancel the CLI reported ends its run cancelled, and nothing of it starts after;
an unschedule stops the schedule's fires), no stage starts twice at once in a run, a stage
that finished never starts again in its run (its dependents start after its last start,
and the chute process that saw a task end never starts that stage again: only a crash
before its end was recorded may), fires of an `overlap: skip` schedule never overlap,
every run.json is final, queue/ and control/ are empty, and nothing a task started is
left: no process, no cgroup.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import chute_env, spool_cgroups, wait_for
from daemon_proc import Daemon, drop

TASK = Path(__file__).with_name("ledger_task.py")
RUN_ID = re.compile(r"\d{8}_\d{6}_[0-9a-f]{6}")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")
CRASH_POINTS = (
    "control.recorded",
    "retry.copied",
    "gc.renamed",
    "schedules.run_made",
    "schedules.spent",
    "loop.attempt_recorded",
)

# Pipelines the storm drops: stage -> its dependencies (the ledger checks follow them).
DAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "chain": {"a": (), "b": ("a",), "c": ("b",), "d": ("a",)},
    "flaky": {"a": (), "b": ("a",)},
    "broken": {"a": (), "b": ("a",), "c": ("b",)},
    "blocker": {"a": (), "b": ()},
    "queued": {"a": ()},
    "sk": {"a": ()},
    "qu": {"a": ()},
    "al": {"a": ()},
    "at": {"a": ()},
}
GATED = ("blocker", "queued")  # runs that wait for the gate: each gets cancelled


# -- the ledger ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    run_id: str
    stage: str  # <stage>/<shard>
    n: int
    event: str
    tag: str
    pid: int
    pstart: int | None
    wall: float
    owner: int  # the chute process the task descends from (0: gone already)


def read_ledger(path: Path) -> list[Entry]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        run_id, stage, n, event, tag, pid, pstart, wall, owner = line.split(" ")
        out.append(
            Entry(
                run_id,
                stage,
                int(n),
                event,
                tag,
                int(pid),
                None if pstart == "None" else int(pstart),
                float(wall),
                int(owner),
            )
        )
    return out


def pstart(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot (None: gone, or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


# -- what was asked, and what was acknowledged ---------------------------------------------------


@dataclass(slots=True)
class Drop:
    tag: str
    name: str
    kind: str


@dataclass(slots=True)
class Ask:
    """One CLI request: its command, when it returned, its code and output."""

    what: str
    args: tuple[str, ...]
    ended: float = 0.0
    code: int | None = None
    out: str = ""
    err: str = ""


@dataclass(slots=True)
class Life:
    """One daemon process: when it started and ended, how (killed, crashed at a point,
    stopped), and its RSS and fd samples (seconds since start, bytes, fds)."""

    pid: int
    started: float
    crash_at: str | None
    ended: float | None = None
    how: str = ""
    samples: list[tuple[float, int, int]] = field(default_factory=list)


class Busy(threading.Thread):
    """`target(*args)` in a thread; `join_or_raise` re-raises what it raised."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        super().__init__(name="storm-operations", daemon=True)
        self._call = (target, args)
        self.failure: BaseException | None = None

    def run(self) -> None:
        target, args = self._call
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the test's thread)
            self.failure = exc

    def join_or_raise(self) -> None:
        self.join()
        if self.failure is not None:
            raise self.failure


# -- the watcher ------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Reads every run folder's run.json as it appears and until it is final, so a run
    that retention removes later is still known (runs/.gc-<id> included)."""

    def __init__(self, runs: Path) -> None:
        super().__init__(name="storm-watcher", daemon=True)
        self.runs = runs
        self.seen: dict[str, dict[str, Any]] = {}
        self.final_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            self.scan()

    def scan(self) -> None:
        try:
            names = os.listdir(self.runs)
        except FileNotFoundError:
            return
        for name in names:
            run_id = name.removeprefix(".gc-")
            if run_id.startswith(".") or name == "latest" or run_id in self.final_at:
                continue
            try:
                rec = orjson.loads((self.runs / name / "run.json").read_bytes())
            except (OSError, ValueError):
                continue
            with self.lock:
                self.seen[run_id] = rec
                if rec.get("state") in FINAL:
                    self.final_at[run_id] = time.time()

    def close(self) -> None:
        self._done.set()
        self.join()
        self.scan()

    def by_source(self, source: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.seen.values() if r["trigger"].get("source") == source]

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return dict(self.seen)


# -- the storm --------------------------------------------------------------------------------


class Storm:
    """The operations of a storm on one spool, each remembered with what it acknowledged."""

    def __init__(
        self,
        spool: Path,
        tmp: Path,
        factory: Callable[..., Daemon],
        config: str,
        seed: int,
    ) -> None:
        self.spool = spool
        self.tmp = tmp
        self.factory = factory
        self.config = config
        self.rng = random.Random(seed + 3)  # durations, and whom to cancel or retry
        self.ledger = tmp / "ledger"
        self.gate = tmp / "gate"
        self.calls = tmp / "calls"
        self.calls.mkdir()
        shutil.copy(TASK, self.calls / "ledger_task.py")
        (spool / "incoming").mkdir(parents=True, exist_ok=True)
        self.drops: dict[str, Drop] = {}
        self.asks: list[Ask] = []
        self.schedules: dict[str, str] = {}  # schedule name -> kind
        self.lives: list[Life] = []
        self.cancelled: set[str] = set()  # run ids a cancel was asked for
        self.watcher = Watcher(spool / "runs")
        # Cancels wait for their runs to end; retries and gc have threads of their own, so
        # they run when asked, not once the cancels before them are done (their runs would
        # be gone by then: retention keeps few).
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="storm-cancel")
        self.quick = ThreadPoolExecutor(max_workers=2, thread_name_prefix="storm-cli")
        self.pending: list[Future[None]] = []
        self.daemon: Daemon | None = None
        self._count = 0
        self._lock = threading.Lock()

    # -- specs -------------------------------------------------------------------------------

    def _run_stage(self, name: str, tag: str, flags: str, extra: str = "") -> str:
        argv = orjson.dumps([sys.executable, "-S", str(self.calls / "ledger_task.py")]).decode()
        argv = argv[:-1] + f', "{self.ledger}", "{tag}", "{flags}"]'
        return f"    - {{name: {name}, run: {argv}{extra}}}\n"

    def _call_stage(self, name: str, tag: str, flags: str, extra: str = "") -> str:
        return (
            f"    - {{name: {name}, call: 'ledger_task:call', env: {{PYTHONPATH: '{self.calls}'}},"
            f" with: {{ledger: '{self.ledger}', tag: '{tag}', flags: '{flags}'}}{extra}}}\n"
        )

    def spec(self, kind: str, tag: str, schedule: str = "") -> str:
        def nap(lo: float, hi: float) -> str:
            return f"sleep={self.rng.uniform(lo, hi):.2f}"

        # Drops share their kind's name (retention keeps only each pipeline's latest run);
        # a schedule is named by its tag, as schedules/ names it.
        name = tag if schedule else kind
        head = f"apiVersion: chute/v1\nkind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n"
        if schedule:
            head += f"  schedule: {schedule}\n"
        if kind == "chain":
            return (
                head
                + "  priority: 1\n  stages:\n"
                + (
                    self._run_stage("a", tag, nap(0.1, 0.5) + ",child")
                    + self._call_stage("b", tag, nap(0.2, 1.0), ", dependsOn: [a]")
                    + self._run_stage("c", tag, nap(0.1, 0.4), ", dependsOn: [b]")
                    + self._call_stage("d", tag, nap(0.1, 0.3), ", dependsOn: [a], shards: 2")
                )
            )
        if kind == "flaky":
            retries = ", retries: {max: 2, delay: 100ms, onExitCodes: [75]}"
            return (
                head
                + "  priority: 1\n  stages:\n"
                + (
                    self._run_stage("a", tag, nap(0.1, 0.4) + ",fail_first", retries)
                    + self._call_stage("b", tag, nap(0.1, 0.5), ", dependsOn: [a]")
                )
            )
        if kind == "broken":
            return (
                head
                + "  priority: 1\n  stages:\n"
                + (
                    self._run_stage("a", tag, nap(0.1, 0.3))
                    + self._call_stage("b", tag, nap(0.1, 0.3), ", dependsOn: [a]")
                    + self._run_stage("c", tag, "fail", ", dependsOn: [b]")
                )
            )
        if kind == "blocker":  # a cancel target: a task that ignores TERM, a call
            return (
                head
                + "  priority: 1\n  stages:\n"
                + (
                    self._run_stage("a", tag, f"gate={self.gate},ignore_term,setsid_child")
                    + self._call_stage("b", tag, f"gate={self.gate}")
                )
            )
        if kind == "queued":  # a cancel target that waits for both cores
            return (
                head
                + "  priority: -5\n  stages:\n"
                + self._run_stage("a", tag, f"gate={self.gate},child", ", cpus: 2")
            )
        if kind == "sk":  # longer than its period: fires find it running
            return (
                head
                + "  priority: 2\n  stages:\n"
                + self._run_stage("a", tag, nap(1.1, 1.6) + ",group=sk")
            )
        if kind == "qu":
            return head + "  priority: 2\n  stages:\n" + self._call_stage("a", tag, nap(1.0, 1.3))
        if kind in ("al", "at"):
            return head + "  stages:\n" + self._run_stage("a", tag, nap(0.05, 0.2))
        raise ValueError(kind)

    def _tag(self, kind: str) -> str:
        with self._lock:
            self._count += 1
            return f"{kind}{self._count:05d}"

    # -- operations ------------------------------------------------------------------------------

    def drop(self, kind: str) -> Drop:
        tag = self._tag(kind)
        name = f"{tag}.yaml"
        if kind == "bad":  # a file to reject exactly once
            text = f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: {tag}}}\nspec:\n  cpus: 1\n"
        else:
            text = self.spec(kind, tag)
        d = Drop(tag, name, kind)
        self.drops[tag] = d
        drop(self.spool, name, text)
        return d

    def schedule(self, kind: str, schedule: str) -> str:
        tag = self._tag(kind)
        self.schedules[tag] = kind
        drop(self.spool, f"{tag}.yaml", self.spec(kind, tag, schedule))
        return tag

    def schedule_at(self, delay: float) -> str:
        when = datetime.now(UTC) + timedelta(seconds=delay)
        return self.schedule("at", f"{{at: '{when.isoformat()}'}}")

    def cli(self, what: str, *args: str, timeout: float = 90) -> Ask:
        ask = Ask(what, args)
        cmd = [sys.executable, "-m", "chute", what, *args, "--spool", str(self.spool)]
        cmd += ["--config", str(self.tmp / "chute.yaml")]
        try:
            p = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=chute_env()
            )
            ask.code, ask.out, ask.err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            ask.code, ask.err = None, f"timed out: {exc}"
        ask.ended = time.time()
        with self._lock:
            self.asks.append(ask)
        return ask

    def act(self, rng: random.Random, shares: dict[str, float], kinds: dict[str, int]) -> None:
        """One user action, drawn by `shares` of "drop" (a kind drawn by `kinds`' weights),
        "cancel", "retry", "gc" and "at" (an `at` schedule up to 30 s ahead)."""
        what = rng.choices(list(shares), list(shares.values()))[0]
        if what == "drop":
            self.drop(rng.choices(list(kinds), list(kinds.values()))[0])
        elif what == "cancel":
            self.cancel_some()
        elif what == "retry":
            self.retry_some()
        elif what == "gc":
            self.later("gc")
        else:
            self.schedule_at(rng.uniform(1, 30))

    def later(self, what: str, *args: str) -> None:
        """Run `chute what args` in a thread of the storm's pool (a cancel waits for its run)."""
        pool = self.pool if what == "cancel" else self.quick
        self.pending.append(pool.submit(self.cli, what, *args))

    def cancel(self, run_id: str) -> None:
        self.cancelled.add(run_id)
        self.later("cancel", run_id)

    def run_of(self, tag: str) -> str | None:
        recs = self.watcher.by_source(f"incoming/{self.drops[tag].name}")
        return recs[0]["run_id"] if recs else None

    def cancel_some(self) -> bool:
        """Cancel one gated run (a blocker or a queued one) whose run exists; False if none."""
        open_ = [t for t, d in self.drops.items() if d.kind in GATED and self.run_of(t) is not None]
        targets = [t for t in open_ if self.run_of(t) not in self.cancelled]
        if not targets:
            return False
        run_id = self.run_of(self.rng.choice(targets))
        assert run_id is not None
        self.cancel(run_id)
        return True

    def retry_some(self) -> bool:
        """Retry one finished run of a chain, flaky or broken pipeline (--from half the
        time); False if there is none yet."""
        seen = self.watcher.snapshot()
        done = sorted(
            r["run_id"]
            for r in seen.values()
            if r.get("pipeline") in ("chain", "flaky", "broken") and r.get("state") in FINAL
        )
        done = [r for r in done if (self.spool / "runs" / r).exists()][-3:]
        if not done:
            return False
        run_id = self.rng.choice(done)  # retention may still remove it: the CLI says so
        stage = {"chain": "b", "flaky": "a", "broken": "c"}[seen[run_id]["pipeline"]]
        if self.rng.random() < 0.5:
            self.later("retry", run_id, "--from", stage)
        else:
            self.later("retry", run_id)
        return True

    def unschedule(self, tag: str) -> Ask:
        """`chute unschedule`; exit 1 (no daemon took it within 10 s, while they were killed)
        leaves the request to the next one: settling waits for schedules/ to empty."""
        return self.cli("unschedule", tag)

    def wait_asks(self) -> None:
        for f in self.pending:
            f.result()
        self.pending.clear()

    # -- the daemon ------------------------------------------------------------------------------

    def start(self, crash_at: str | None = None) -> Daemon:
        """Start a daemon (armed at `crash_at`, if given); one that crashes at its point
        while starting is started again, unarmed."""
        env = {"CHUTE_CRASH_AT": crash_at} if crash_at else None
        d = self.factory(self.config, env=env)
        d.start(wait_ready=False)
        assert d.proc is not None
        life = Life(d.proc.pid, time.time(), crash_at)
        self.lives.append(life)

        def ready() -> bool:
            d.receive()
            return "READY=1" in d.messages or d.proc is None or d.proc.poll() is not None

        wait_for("the daemon to start", ready, timeout=60)
        if d.proc is not None and d.proc.poll() is not None:
            life.ended, life.how = time.time(), f"crashed at {crash_at} while starting"
            if crash_at is None:
                pytest.fail(f"daemon exited {d.proc.returncode}:\n{d.log.read_text()[-3000:]}")
            return self.start()
        self.daemon = d
        return d

    def kill(self) -> None:
        """SIGKILL the daemon (if it did not crash at its point already)."""
        d, life = self.daemon, self.lives[-1]
        assert d is not None
        crashed = self.crashed()
        d.stop(signal.SIGKILL)
        life.ended = time.time()
        life.how = f"crashed at {life.crash_at}" if crashed else "killed"
        self.daemon = None

    def reload(self, config: str) -> None:
        """Write `config` where the daemon reads it and send SIGHUP (later starts use it too)."""
        self.config = config
        (self.tmp / "chute.yaml").write_text(config + "\nhttp: {listen: 127.0.0.1:0}\n")
        assert self.daemon is not None
        assert self.daemon.proc is not None
        self.daemon.proc.send_signal(signal.SIGHUP)

    def crashed(self) -> bool:
        """Whether the daemon died by itself (a crash point): restart it then."""
        d = self.daemon
        return d is not None and d.proc is not None and d.proc.poll() is not None

    def stop(self) -> int:
        d, life = self.daemon, self.lives[-1]
        assert d is not None
        code = d.stop(signal.SIGTERM, timeout=120)
        life.ended, life.how = time.time(), "stopped"
        self.daemon = None
        return code

    def sample(self) -> None:
        """One RSS and fd sample of the running daemon."""
        d = self.daemon
        if d is None or d.proc is None:
            return
        pid = d.proc.pid
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
                "SC_PAGE_SIZE"
            )
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, ValueError):
            return
        life = self.lives[-1]
        life.samples.append((time.time() - life.started, rss, fds))

    # -- the end ---------------------------------------------------------------------------------

    def unsettled(self) -> str | None:
        """What is not done yet (None: every file taken, every request done, every run
        final, no schedule left)."""
        for folder in ("incoming", "queue", "control", "schedules"):
            path = self.spool / folder
            left = [n for n in os.listdir(path) if not n.startswith(".")] if path.exists() else []
            if left:
                return f"{folder}/ holds {sorted(left)[:5]}"
        self.watcher.scan()
        for run_id, rec in self.watcher.snapshot().items():
            if rec.get("state") not in FINAL and (self.spool / "runs" / run_id).exists():
                return f"run {run_id} is {rec.get('state')}"
        return None

    def wait_settled(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (why := self.unsettled()) is not None:
            if time.monotonic() > deadline:
                pytest.fail(f"not settled after {timeout}s: {why}")
            time.sleep(0.2)


# -- the checks -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    drops: int = 0
    rejected: int = 0
    runs: int = 0
    cancels: int = 0
    retries: int = 0
    foreground_retries: int = 0
    refused_retries: int = 0
    refusals: Counter[str] = field(default_factory=Counter)  # why retries were refused
    fires: dict[str, int] = field(default_factory=dict)
    starts: int = 0
    restarted_stages: int = 0
    resumed: int = 0
    lives: int = 0

    def line(self) -> str:
        return (
            f"{self.lives} daemon lives, {self.drops} drops ({self.rejected} rejected), "
            f"{self.runs} runs seen, {self.cancels} cancels, {self.retries} retries "
            f"({self.foreground_retries} in the foreground, {self.refused_retries} refused: "
            f"{dict(self.refusals)}), "
            f"fires {self.fires}, "
            f"{self.starts} task starts ({self.restarted_stages} started again after a crash), "
            f"{self.resumed} runs resumed"
        )


def check(storm: Storm) -> Tally:
    """Every check of the module docstring; returns what happened, for the test's output."""
    spool = storm.spool
    entries = read_ledger(storm.ledger)
    seen = storm.watcher.snapshot()
    on_disk: dict[str, dict[str, Any]] = {}
    for folder in (spool / "runs").iterdir():
        if folder.is_symlink() or folder.name.startswith("."):
            continue
        rec = orjson.loads((folder / "run.json").read_bytes())  # every run.json parses
        assert rec["state"] in FINAL, f"{folder.name} is {rec['state']} at the end"
        with contextlib.suppress(FileNotFoundError):  # none: cancelled before it started
            orjson.loads((folder / "manifest.json").read_bytes())
        on_disk[folder.name] = rec
    # Retention removes only runs whose run.json is final: one the watcher last saw running
    # and that is gone ended, though in a state the watcher missed (it polls; a run that ends
    # long after newer ones started may be removed as soon as it ends).
    removed = {r for r, rec in seen.items() if rec.get("state") not in FINAL} - set(on_disk)
    seen.update(on_disk)
    tally = Tally(drops=len(storm.drops), runs=len(seen), lives=len(storm.lives))
    tally.resumed = sum(1 for r in seen.values() if r.get("recoveries"))
    problems: list[str] = []

    # Nothing left behind: queue/, control/, incoming/ and intake's claims are empty.
    for folder in ("queue", "control", "incoming", "state/intake"):
        path = spool / folder
        left = sorted(os.listdir(path)) if path.exists() else []
        if left:
            problems.append(f"{folder}/ not empty at the end: {left[:10]}")
    gc_left = [n for n in os.listdir(spool / "runs") if n.startswith(".gc-")]

    by_run: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_run[e.run_id].append(e)
    tally.starts = sum(1 for e in entries if e.event == "start")

    # Each drop: one run or one rejection.
    rejected = (
        {p.name for p in (spool / "rejected").iterdir()} if (spool / "rejected").exists() else set()
    )
    runs_of_tag: dict[str, set[str]] = defaultdict(set)
    for e in entries:  # a retry's tasks carry the tag of the drop it retries
        if e.run_id not in seen or seen[e.run_id]["trigger"].get("type") == "drop":
            runs_of_tag[e.tag].add(e.run_id)
    for r in seen.values():
        trig = r["trigger"]
        if trig.get("type") == "drop":
            tag = Path(str(trig.get("source"))).stem
            runs_of_tag[tag].add(r["run_id"])
    for tag, d in storm.drops.items():
        made = runs_of_tag.get(tag, set())
        if d.kind == "bad":
            tally.rejected += 1
            if made or d.name not in rejected or f"{d.name}.error.json" not in rejected:
                problems.append(f"{d.name}: bad file not rejected exactly once (runs {made})")
            if f"{d.name}.1" in rejected:
                problems.append(f"{d.name}: rejected twice")
            continue
        if d.name in rejected:
            problems.append(f"{d.name}: a good file was rejected")
        if len(made) != 1:
            problems.append(f"{d.name}: {len(made)} runs ({sorted(made)}), not one")
    refused = " ".join(a.err for a in storm.asks if a.what == "retry" and a.code == 2)
    extra_rejections = sorted(
        n
        for n in rejected
        if not n.endswith(".error.json")
        and Path(n).stem not in storm.drops
        and f"/rejected/{n}.error.json)" not in refused  # a refusal the CLI reported
    )
    if extra_rejections:  # a control request refused unannounced, or a schedule file
        problems.append(f"rejected/ holds what was not a bad drop: {extra_rejections[:10]}")

    # Per run and stage: no two starts at once, a stage never starts after a dependent did,
    # and a stage that ended never starts again unless a crash came between.
    for run_id, es in by_run.items():
        kind = es[0].tag.rstrip("0123456789")
        dag = DAGS.get(kind, {})
        starts: dict[str, list[Entry]] = defaultdict(list)
        for e in es:
            if e.event == "overlap":
                problems.append(
                    f"{run_id} {e.stage}: started while pid {e.pid} (an earlier start"
                    f"{' of another run of its schedule' if kind == 'sk' else ''}) was alive"
                )
            if e.event == "start":
                starts[e.stage.split("/")[0]].append(e)
        for stage, deps in dag.items():
            for dep in deps:
                if starts.get(stage) and starts.get(dep):
                    first = min(x.wall for x in starts[stage])
                    last = max(x.wall for x in starts[dep])
                    if last > first:
                        problems.append(
                            f"{run_id}: {dep} started again after its dependent {stage} started"
                        )
        for e in es:
            if e.event != "end":
                continue
            ran = [
                x
                for x in es
                if x.event == "start" and x.stage == e.stage and x.pid == e.pid and x.wall <= e.wall
            ]
            first = max(ran, key=lambda x: x.wall)  # the start that ended here
            for x in es:
                if x.stage != e.stage or x.event != "start" or x.wall <= e.wall:
                    continue
                if first.owner == 0 or x.owner != first.owner:
                    tally.restarted_stages += 1  # its owner died: the end was not recorded
                else:  # the chute process that saw it end started it again
                    problems.append(
                        f"{run_id} {e.stage}: ended at {e.wall:.3f} and started again at "
                        f"{x.wall:.3f} by the same chute process (pid {x.owner})"
                    )

    # Acknowledged cancels: the run ends cancelled; nothing of it starts after the CLI said so.
    for ask in storm.asks:
        if ask.what != "cancel":
            continue
        tally.cancels += 1
        run_id = ask.args[0]
        rec = seen.get(run_id)
        state = rec.get("state") if rec else None
        if ask.code != 0:
            problems.append(f"cancel {run_id}: exit {ask.code}: {ask.err.strip()[-300:]}")
        elif ask.out.strip() not in (f"{run_id} cancelled", f"{run_id} already cancelled"):
            problems.append(f"cancel {run_id}: said {ask.out.strip()!r}")
        if state != "cancelled" and not (run_id in removed and ask.code == 0):
            problems.append(f"cancel {run_id}: the run ended {state}, not cancelled")
        late = [e for e in by_run.get(run_id, []) if e.event == "start" and e.wall > ask.ended]
        if ask.code == 0 and late:
            problems.append(f"cancel {run_id}: {late[0].stage} started after the cancel")
    for tag, d in storm.drops.items():
        if d.kind in GATED:
            made = runs_of_tag.get(tag, set())
            if made and not made & storm.cancelled:
                problems.append(f"{d.name}: gated run {made} was never cancelled by the storm")

    # Acknowledged retries: the printed id is a run, once, final; no retry run unasked for.
    asked: set[str] = set()
    for ask in storm.asks:
        if ask.what != "retry":
            continue
        old = ask.args[0]
        words = ask.out.split()
        new_id = None
        if ask.out.startswith(f"retry of {old} submitted as "):
            new_id = words[-1]
        elif words[:1] == ["run"]:  # no daemon: run in the foreground; the summary's head
            new_id = words[1]
            tally.foreground_retries += 1
        if new_id is None:
            tally.refused_retries += 1
            why = (ask.err.strip().splitlines() or [f"exit {ask.code}, no message"])[-1]
            tally.refusals[RUN_ID.sub("<id>", why)[:90]] += 1
            if ask.code != 2:  # refused: the run was removed, or not final yet
                problems.append(f"retry {old}: exit {ask.code}: {ask.err.strip()[-300:]}")
            continue
        tally.retries += 1
        asked.add(new_id)
        rec = seen.get(new_id)
        if rec is None:
            problems.append(f"retry {old} as {new_id}: no such run was ever made")
        elif rec["trigger"] != {"type": "retry", "source": old} or (
            rec["state"] not in FINAL and new_id not in removed
        ):
            problems.append(f"retry {old} as {new_id}: {rec['trigger']} ended {rec['state']}")
    made_retries = {  # a refused request's half-made run ends failed, saying so
        r["run_id"]
        for r in seen.values()
        if r["trigger"].get("type") == "retry"
        and not str(r.get("error") or "").startswith("retry not finished:")
    }
    if made_retries - asked:
        problems.append(f"retry runs nobody was told of: {sorted(made_retries - asked)[:10]}")

    # Schedules: each `at` fired once and left schedules/; unscheduled ones stopped firing.
    fires: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in seen.values():
        source = str(r["trigger"].get("source", ""))
        if source.startswith("schedules/"):
            fires[Path(source).stem].append(r)
    tally.fires = {t: len(fires.get(t, [])) for t in storm.schedules}
    for tag, kind in storm.schedules.items():
        if kind == "at":
            if len(fires.get(tag, [])) != 1:
                problems.append(f"at schedule {tag}: {len(fires.get(tag, []))} runs, not one")
            if (spool / "schedules" / f"{tag}.yaml").exists():
                problems.append(f"at schedule {tag}: still in schedules/ after its fire")
    for ask in storm.asks:
        if ask.what != "unschedule":
            continue
        tag = ask.args[0]
        if ask.code == 1 and "the daemon has not done it yet" in ask.err:
            continue  # not acknowledged: its request was carried out later
        if ask.code != 0:
            problems.append(f"unschedule {tag}: exit {ask.code}: {ask.err.strip()[-300:]}")
            continue
        for r in fires.get(tag, []):
            created = datetime.fromisoformat(r["created_at"].replace("Z", "+00:00")).timestamp()
            if created > ask.ended:
                problems.append(f"{tag}: fire {r['run_id']} made after its unschedule")

    # Nothing a task started is alive; no cgroup of the spool is left.
    for e in entries:
        if e.event in ("start", "child") and e.pstart is not None and pstart(e.pid) == e.pstart:
            problems.append(f"{e.run_id} {e.stage}: {e.event} pid {e.pid} still alive")
    for group in spool_cgroups(storm.tmp):
        if group.exists():
            problems.append(f"cgroup {group} left behind")

    if gc_left:
        problems.append(f"runs/.gc- leftovers at the end: {gc_left}")
    assert not problems, "\n".join(problems[:60]) + f"\n({len(problems)} problems)"
    return tally


@contextlib.contextmanager
def running(storm: Storm) -> Iterator[Storm]:
    """The storm's watcher and CLI pool for the test's life."""
    storm.watcher.start()
    try:
        yield storm
    finally:
        storm.pool.shutdown(wait=True)
        storm.quick.shutdown(wait=True)
        storm.watcher.close()
