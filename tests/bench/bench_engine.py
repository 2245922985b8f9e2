"""Engine overhead against the floor, measured in one run (not part of the test suite).

    python tests/bench/bench_engine.py [--repeat 3]

1. 1,000 independent `run: "true"` stages on 2 cores vs. a plain subprocess loop over 2
   threads running the same 1,000 `true`.
2. 2,000 trivial `call:` stages (return x+1) vs. ProcessPoolExecutor(2) submitting the
   same function one by one.
3. a 200-stage DAG (20 layers x 10, each stage after two of the layer before) of `true`
   vs. GNU make -j2 on the equivalent Makefile.

chute is timed as the whole `chute run` command (interpreter start, validation, durable
run folder, every output.json and manifest fsynced); the table gives the per-stage
overhead above the floor (the package byte-compiled first, as an install leaves it:
benchenv.py). Each case runs twice: with the spool on the root filesystem
(`sync: auto` fsyncs each file and folder there), and on a fresh filesystem of its own
with `sync: syncfs` (ownfs.py; left out, with the reason, where it cannot be mounted).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_funcs  # noqa: E402
import benchenv  # noqa: E402
import ownfs  # noqa: E402


def chute_run(spec: Path, spool: Path, config: Path) -> float:
    t = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "chute",
            "run",
            str(spec),
            "--spool",
            str(spool),
            "-q",
            "--config",
            str(config),
        ],
        env=benchenv.env(),
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"chute run failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return elapsed


def floor_subprocess(n: int, threads: int = 2) -> float:
    todo = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            subprocess.run(["true"], check=True)

    t = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return time.perf_counter() - t


def floor_pool(n: int) -> float:
    ctx = multiprocessing.get_context("forkserver")
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        list(pool.map(bench_funcs.inc, range(4)))  # warm the workers, as chute's pool is
        t = time.perf_counter()
        futures = [pool.submit(bench_funcs.inc, i) for i in range(n)]
        for f in futures:
            f.result()
        return time.perf_counter() - t


def floor_make(folder: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["make", "-s", "-j2", "-f", str(folder / "Makefile")], check=True, cwd=folder)
    return time.perf_counter() - t


def independent_spec(n: int) -> str:
    stages = "\n".join(f'    - {{name: s{i}, run: "true"}}' for i in range(n))
    head = "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: flat}\nspec:\n"
    return f"{head}  stages:\n{stages}\n"


def call_spec(n: int) -> str:
    stages = "\n".join(
        f"    - {{name: c{i}, call: 'bench_funcs:inc_kw', with: {{x: {i}}}}}" for i in range(n)
    )
    return (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: calls}\n"
        f"spec:\n  workdir: {HERE}\n  stages:\n{stages}\n"
    )


def dag_edges(layers: int = 20, width: int = 10) -> dict[str, list[str]]:
    edges: dict[str, list[str]] = {}
    for layer in range(layers):
        for j in range(width):
            deps = [] if layer == 0 else [f"l{layer - 1}_{j}", f"l{layer - 1}_{(j + 1) % width}"]
            edges[f"l{layer}_{j}"] = deps
    return edges


def dag_spec(edges: dict[str, list[str]]) -> str:
    lines = []
    for name, deps in edges.items():
        dep = f", dependsOn: [{', '.join(deps)}]" if deps else ""
        lines.append(f'    - {{name: {name}, run: "true"{dep}}}')
    return (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: dag}\nspec:\n  stages:\n"
        + "\n".join(lines)
        + "\n"
    )


def makefile(edges: dict[str, list[str]]) -> str:
    out = [".PHONY: all " + " ".join(edges), "all: " + " ".join(edges)]
    for name, deps in edges.items():
        out.append(f"{name}: {' '.join(deps)}\n\t@true")
    return "\n".join(out) + "\n"


def best(fn: Callable[[], float], repeat: int) -> float:
    """The fastest of `repeat` runs, each from a quiet disk (benchenv.settle)."""
    times = []
    for _ in range(repeat):
        benchenv.settle()
        times.append(fn())
    return min(times)


Case = tuple[str, int, Callable[[], float], str, Callable[[], float], float | None]
Row = tuple[str, float, str, float, float, float, float | None]


def measure(cases: list[Case], rows: list[Row], repeat: int) -> None:
    for name, n, ours, floor_name, floor, target in cases:
        t_ours = best(ours, repeat)
        t_floor = best(floor, repeat)
        over = (t_ours - t_floor) / n * 1000
        rows.append((name, t_ours, floor_name, t_floor, t_ours / t_floor, over, target))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    benchenv.prepare()
    work = Path(tempfile.mkdtemp(prefix="chute-bench-"))
    config = work / "chute.yaml"
    config.write_text("cpus: 2\n")
    rows: list[Row] = []
    try:
        flat = work / "flat.yaml"
        flat.write_text(independent_spec(1000))
        calls = work / "calls.yaml"
        calls.write_text(call_spec(2000))
        edges = dag_edges()
        dag = work / "dag.yaml"
        dag.write_text(dag_spec(edges))
        (work / "Makefile").write_text(makefile(edges))

        def cases(root: Path, cfg: Path, where: str) -> list[Case]:
            def fresh(name: str) -> Path:
                return root / f"spool-{name}-{time.monotonic_ns()}"

            return [
                (
                    f"1,000 run: true, 2 cores{where}",
                    1000,
                    lambda: chute_run(flat, fresh("flat"), cfg),
                    "subprocess x2 threads",
                    lambda: floor_subprocess(1000),
                    2.0,
                ),
                (
                    f"2,000 call: x+1, 2 cores{where}",
                    2000,
                    lambda: chute_run(calls, fresh("calls"), cfg),
                    "ProcessPoolExecutor(2)",
                    lambda: floor_pool(2000),
                    1.0,
                ),
                (
                    f"200-stage DAG (20x10) of true{where}",
                    200,
                    lambda: chute_run(dag, fresh("dag"), cfg),
                    "make -j2",
                    lambda: floor_make(work),
                    None,
                ),
            ]

        measure(cases(work, config, ""), rows, args.repeat)
        why_not = ownfs.unavailable()
        if why_not is None:
            with ownfs.own_filesystem() as mnt:
                own = mnt / "chute.yaml"
                own.write_text("cpus: 2\nsync: syncfs\n")
                measure(cases(mnt, own, ", own fs + syncfs"), rows, args.repeat)
        else:
            print(f"(no own-filesystem rows: {why_not})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = ("case", "chute s", "floor", "floor s", "ratio", "overhead ms/stage", "target")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name, t_ours, floor_name, t_floor, ratio, over, target in rows:
        tgt = (
            "-" if target is None else f"<= {target:.0f} ms {'ok' if over <= target else 'MISSED'}"
        )
        print(
            f"{name} | {t_ours:.2f} | {floor_name} | {t_floor:.2f} | {ratio:.1f}x"
            f" | {over:.2f} | {tgt}"
        )
    # The minimum is the least noisy estimate on a shared 2-core machine.
    print(f"\n(best of {args.repeat}; {os.cpu_count()} CPUs; python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
