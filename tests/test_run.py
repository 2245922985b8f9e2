"""`chute run` end to end: real files, real processes, the run folder as DESIGN.md lays it out."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from chute.scheduling.topology import format_cpulist
from conftest import EXAMPLES, REPO, Chute, chute_env, load_json, pid_alive, wait_for
from daemon_proc import Daemon, daemon_factory, drop, runs_of

__all__ = ["daemon_factory"]  # a fixture, used by name

SCHEMAS = REPO / "daemon" / "chute" / "schemas"
Spec = Callable[[str, str], Path]


def schema(name: str) -> dict[str, Any]:
    return load_json(SCHEMAS / f"{name}.schema.json")  # type: ignore[no-any-return]


def latest(spool: Path) -> Path:
    return (spool / "runs" / os.readlink(spool / "runs" / "latest")).resolve()


def stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in load_json(run_dir / "manifest.json")["stages"]}


def check_run_files(run_dir: Path) -> None:
    """Every JSON file of the run matches its shipped schema; no temp file is left."""
    jsonschema.validate(load_json(run_dir / "run.json"), schema("run"))
    jsonschema.validate(load_json(run_dir / "manifest.json"), schema("manifest"))
    for out in run_dir.glob("stages/**/output.json"):
        jsonschema.validate(load_json(out), schema("output"))
    leftovers = list(run_dir.rglob(".tmp-*"))
    assert leftovers == []


def pipeline(name: str, stages_yaml: str, extra: str = "") -> str:
    body = "\n".join("    " + line for line in stages_yaml.strip("\n").splitlines())
    return (
        f"apiVersion: chute/v1\nkind: Pipeline\nmetadata:\n  name: {name}\n"
        f"spec:\n{extra}  stages:\n{body}\n"
    )


def test_etl_example_runs_and_leaves_a_complete_run_folder(spool: Path, chute: Chute) -> None:
    done = chute("run", str(EXAMPLES / "etl.yaml"))
    assert done.code == 0, done.err
    run_dir = latest(spool)
    rec = load_json(run_dir / "run.json")
    assert rec["state"] == "succeeded"
    assert rec["pipeline"] == "seed-etl"
    assert rec["trigger"] == {"type": "run", "source": str(EXAMPLES / "etl.yaml")}
    spec_bytes = (run_dir / "spec.yaml").read_bytes()
    assert spec_bytes == (EXAMPLES / "etl.yaml").read_bytes()
    assert rec["spec_sha256"] == hashlib.sha256(spec_bytes).hexdigest()
    assert (spool / "pipelines" / "seed-etl" / "latest").resolve() == run_dir
    names = [s["name"] for s in load_json(run_dir / "manifest.json")["stages"]]
    assert names.index("raw_orders") < names.index("mat_order_facts") < names.index("check_totals")
    out = load_json(run_dir / "stages" / "check_totals" / "output.json")
    assert out["data"] == {"ok": True, "checked": 500}
    raw = load_json(run_dir / "stages" / "raw_orders" / "output.json")
    assert raw["artifacts"] == [
        {"name": "orders.csv", "path": "artifacts/orders.csv", "type": "text/csv"}
    ]
    check_run_files(run_dir)
    assert "check_totals" in done.out
    assert "succeeded" in done.out


def test_sharded_example_gathers_outputs_in_shard_order(spool: Path, chute: Chute) -> None:
    done = chute("run", str(EXAMPLES / "shards.yaml"))
    assert done.code == 0, done.err
    run_dir = latest(spool)
    data = load_json(run_dir / "stages" / "measure" / "output.json")["data"]
    assert [d["item"] for d in data] == ["alpha", "beta", "gamma", "delta"]
    total = load_json(run_dir / "stages" / "total" / "output.json")
    assert total["data"]["count"] == 4
    assert total["data"]["sum"] == sum(d["value"] for d in data)
    assert total["artifacts"][0]["path"] == "artifacts/summary.txt"
    m = stages(run_dir)["measure"]
    assert [s["index"] for s in m["shards"]] == [0, 1, 2, 3]
    assert "shard 2 of 4: item=gamma" in (run_dir / "stages/measure/2/log").read_text()
    assert "alpha" in (run_dir / "stages/report/log").read_text()
    check_run_files(run_dir)


def test_stage_starts_when_its_own_dependencies_finish_not_in_waves(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "dag.yaml",
        pipeline(
            "dag",
            """
- {name: quick, run: "true"}
- {name: slow, run: "sleep 2"}
- {name: after_quick, dependsOn: [quick], run: "true"}
""",
        ),
    )
    assert chute("run", str(spec)).code == 0
    s = stages(latest(spool))
    assert s["after_quick"]["started_at"] < s["slow"]["finished_at"]


def test_task_environment_is_clean_plus_spec_env_and_chute_variables(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "env.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: envjob}\n"
        "spec:\n  env: {GREETING: hi, COUNT: 3}\n  run: [env]\n",
    )
    done = chute("run", str(spec), env={"SECRET_TOKEN": "leak"})
    assert done.code == 0, done.err
    run_dir = latest(spool)
    env = dict(
        line.split("=", 1)
        for line in (run_dir / "stages/envjob/log").read_text().splitlines()
        if "=" in line
    )
    assert "SECRET_TOKEN" not in env
    assert env["GREETING"] == "hi"
    assert env["COUNT"] == "3"
    assert env["CHUTE_RUN_ID"] == run_dir.name
    assert env["CHUTE_RUN_DIR"] == str(run_dir)
    assert env["CHUTE_STAGE"] == "envjob"
    assert env["CHUTE_ARTIFACTS"] == str(run_dir / "stages/envjob/artifacts")
    assert env["CHUTE_SHARD_INDEX"] == "0"
    assert env["CHUTE_SHARD_COUNT"] == "1"
    assert env["CHUTE_CPUS"] == "1"
    assert len(env["CHUTE_RUN_DATE"]) == 10
    allowed = {"PATH", "HOME", "LANG", "TZ", "GREETING", "COUNT"}
    assert {k for k in env if not k.startswith("CHUTE_")} <= allowed


def test_task_is_pinned_to_its_cores_and_children_inherit(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    ncpu = len(os.sched_getaffinity(0))
    spec = write_spec(
        "pin.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: pin}\n"
        f"spec:\n  cpus: {ncpu}\n"
        "  run: |\n"
        "    echo list=$CHUTE_CPU_LIST\n"
        "    sh -c 'grep Cpus_allowed_list /proc/self/status'\n",
    )
    assert chute("run", str(spec)).code == 0
    run_dir = latest(spool)
    text = (run_dir / "stages/pin/log").read_text()
    cpulist = text.split("list=")[1].split()[0]
    assert f"Cpus_allowed_list:\t{cpulist}" in text
    assert len(stages(run_dir)["pin"]["cores"]) == ncpu


def test_timeout_kills_the_whole_group_including_a_background_grandchild(
    spool: Path, chute: Chute, write_spec: Spec, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    spec = write_spec(
        "slow.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: slow}\n"
        f"spec:\n  timeout: 500ms\n  run: 'sleep 1000 & echo $! > {pidfile}; wait'\n",
    )
    done = chute("run", str(spec), "--config", str(_config(tmp_path, "kill_grace: 1s")))
    assert done.code == 1
    s = stages(latest(spool))["slow"]
    assert s["state"] == "timed_out"
    assert "timed out" in s["attempts"][0]["error"]
    assert not pid_alive(int(pidfile.read_text()))


def test_a_setsid_escapee_does_not_outlive_its_task(
    spool: Path, chute: Chute, write_spec: Spec, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    spec = write_spec(
        "escape.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: escape}\n"
        f"spec:\n  run: 'setsid sleep 1000 > /dev/null 2>&1 < /dev/null & echo $! > {pidfile}'\n",
    )
    assert chute("run", str(spec)).code == 0
    assert not pid_alive(int(pidfile.read_text()))


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chute.yaml"
    path.write_text(text + "\n")
    return path


def test_retries_record_every_attempt_and_honour_on_exit_codes(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "retry.yaml",
        pipeline(
            "retry",
            """
- name: flaky
  run: exit 75
  retries: {max: 2, backoff: exponential, delay: 200ms, maxDelay: 300ms, onExitCodes: [75]}
- name: broken
  run: exit 3
  retries: {max: 2, delay: 100ms, onExitCodes: [75]}
""",
        ),
    )
    assert chute("run", str(spec)).code == 1
    s = stages(latest(spool))
    flaky = s["flaky"]["attempts"]
    assert [a["exit_code"] for a in flaky] == [75, 75, 75]
    assert s["flaky"]["state"] == "failed"
    gaps = [_gap(flaky[i]["finished_at"], flaky[i + 1]["started_at"]) for i in range(2)]
    assert gaps[0] >= 0.2
    assert gaps[1] >= 0.3
    assert len(s["broken"]["attempts"]) == 1


def _gap(a: str, b: str) -> float:
    from chute.clock import parse_rfc3339

    return (parse_rfc3339(b) - parse_rfc3339(a)).total_seconds()


def test_a_retry_that_succeeds_makes_the_stage_succeed(
    spool: Path, chute: Chute, write_spec: Spec, tmp_path: Path
) -> None:
    counter = tmp_path / "count"
    spec = write_spec(
        "flaky.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: flaky}\n"
        "spec:\n  retries: {max: 3, delay: 10ms}\n"
        f"  run: 'echo x >> {counter}; test $(wc -l < {counter}) -ge 2'\n",
    )
    assert chute("run", str(spec)).code == 0
    s = stages(latest(spool))["flaky"]
    assert s["state"] == "succeeded"
    assert [a["exit_code"] for a in s["attempts"]] == [1, 0]
    assert "--- chute: attempt 2" in (latest(spool) / "stages/flaky/log").read_text()


def test_failed_stage_skips_dependents_while_independent_branch_finishes(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "branches.yaml",
        pipeline(
            "branches",
            """
- {name: bad, run: "exit 1"}
- {name: child, dependsOn: [bad], run: "true"}
- {name: grandchild, dependsOn: [child], run: "true"}
- {name: other, run: "sleep 0.3"}
- {name: other_child, dependsOn: [other], run: "true"}
""",
        ),
    )
    done = chute("run", str(spec))
    assert done.code == 1
    s = stages(latest(spool))
    assert {n: s[n]["state"] for n in s} == {
        "bad": "failed",
        "child": "skipped",
        "grandchild": "skipped",
        "other": "succeeded",
        "other_child": "succeeded",
    }
    rec = load_json(latest(spool) / "run.json")
    assert rec["state"] == "failed"
    assert rec["error"] == "stage bad failed: exited with code 1"


def test_fallback_runs_when_a_stage_fails_for_good_and_dependents_go_on(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "fb.yaml",
        pipeline(
            "fb",
            """
- name: fragile
  run: exit 2
  fallback: {run: "echo '{\\"degraded\\": true}' > $CHUTE_OUTPUT"}
- {name: next, dependsOn: [fragile], run: "true"}
""",
        ),
    )
    assert chute("run", str(spec)).code == 0
    run_dir = latest(spool)
    s = stages(run_dir)
    assert s["fragile"]["state"] == "fallback"
    assert s["fragile"]["attempts"][-1]["fallback"] is True
    assert s["next"]["state"] == "succeeded"
    assert load_json(run_dir / "stages/fragile/output.json")["data"] == {"degraded": True}


def test_fail_fast_cancels_running_stages(spool: Path, chute: Chute, write_spec: Spec) -> None:
    spec = write_spec(
        "ff.yaml",
        pipeline(
            "ff",
            """
- {name: bad, run: "sleep 0.2; exit 1"}
- {name: long, run: "sleep 60"}
""",
            extra="  failFast: true\n",
        ),
    )
    done = chute("run", str(spec), timeout=30)
    assert done.code == 1
    s = stages(latest(spool))
    assert s["bad"]["state"] == "failed"
    assert s["long"]["state"] == "cancelled"
    assert s["long"]["duration_seconds"] < 20


def test_output_over_one_mebibyte_is_refused_with_advice(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "big.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: big}\n"
        'spec:\n  run: [python3, -c, "import json,os; '
        "json.dump({'x': 'a' * 1100000}, open(os.environ['CHUTE_OUTPUT'], 'w'))\"]\n",
    )
    assert chute("run", str(spec)).code == 1
    err = stages(latest(spool))["big"]["attempts"][0]["error"]
    assert "over the 1 MiB limit" in err
    assert "CHUTE_ARTIFACTS" in err


def test_cache_hit_skips_the_stage_and_copies_its_output(
    spool: Path, chute: Chute, write_spec: Spec, tmp_path: Path
) -> None:
    counter = tmp_path / "count"
    text = pipeline(
        "cached",
        f"""
- name: expensive
  cache: true
  version: "VERSION"
  run: |
    echo x >> {counter}; echo '{{"n": 42}}' > $CHUTE_OUTPUT
- {{name: use, inputs: {{n: expensive.n}}, run: "true"}}
""",
    )
    spec = write_spec("cache.yaml", text.replace("VERSION", "1"))
    assert chute("run", str(spec)).code == 0
    first = stages(latest(spool))["expensive"]
    assert first["cache"]["hit"] is False
    assert first["state"] == "succeeded"
    assert chute("run", str(spec)).code == 0
    second_dir = latest(spool)
    second = stages(second_dir)["expensive"]
    assert second["state"] == "cached"
    assert second["cache"] == {"key": first["cache"]["key"], "hit": True}
    assert load_json(second_dir / "stages/expensive/output.json")["data"] == {"n": 42}
    assert counter.read_text().count("x") == 1
    assert stages(second_dir)["use"]["cache"] is None
    spec = write_spec("cache.yaml", text.replace("VERSION", "2"))
    assert chute("run", str(spec)).code == 0
    assert stages(latest(spool))["expensive"]["cache"]["hit"] is False
    assert counter.read_text().count("x") == 2


def test_call_stage_whose_worker_dies_fails_alone_and_the_pool_recovers(
    spool: Path, chute: Chute, write_spec: Spec, tmp_path: Path
) -> None:
    (tmp_path / "crashy.py").write_text(
        "import os, signal\n"
        "def die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "def fine(x):\n    return {'y': x + 1}\n"
    )
    spec = write_spec(
        "crash.yaml",
        pipeline(
            "crash",
            """
- {name: dies, call: "crashy:die"}
- {name: lives, call: "crashy:fine", with: {x: 1}}
- {name: after, dependsOn: [dies], call: "crashy:fine", with: {x: 2}}
- {name: later, dependsOn: [lives], call: "crashy:fine", with: {x: 3}}
""",
            extra=f"  workdir: {tmp_path}\n",
        ),
    )
    assert chute("run", str(spec)).code == 1
    run_dir = latest(spool)
    s = stages(run_dir)
    assert s["dies"]["state"] == "failed"
    assert "signal 9" in s["dies"]["attempts"][0]["error"]
    assert s["after"]["state"] == "skipped"
    assert s["lives"]["state"] == "succeeded"
    assert s["later"]["state"] == "succeeded"
    assert load_json(run_dir / "stages/later/output.json")["data"] == {"y": 4}


def test_sharded_call_stage_with_a_retry_keeps_each_shard_folder_whole(
    spool: Path, chute: Chute, write_spec: Spec, tmp_path: Path
) -> None:
    """A first call: attempt has its folders made by its worker; a retry's by the engine."""
    (tmp_path / "flaky.py").write_text(
        "import os\n"
        "def work(ctx):\n"
        "    mark = os.path.join(ctx.artifacts, 'tried')\n"
        "    first = not os.path.exists(mark)\n"
        "    open(mark, 'w').close()\n"
        "    print('attempt of', ctx.shard_index)\n"
        "    if first and ctx.shard_index == 1:\n"
        "        raise RuntimeError('first try fails')\n"
        "    return {'i': ctx.shard_index}\n"
    )
    spec = write_spec(
        "flaky.yaml",
        pipeline(
            "flaky",
            '- {name: s, call: "flaky:work", shards: 3, retries: {max: 1, delay: 0s}}',
            extra=f"  workdir: {tmp_path}\n",
        ),
    )
    done = chute("run", str(spec))
    assert done.code == 0, done.err
    run_dir = latest(spool)
    assert [len(u["attempts"]) for u in stages(run_dir)["s"]["shards"]] == [1, 2, 1]
    for i in range(3):
        shard = run_dir / "stages" / "s" / str(i)
        out = load_json(shard / "output.json")
        assert out["data"] == {"i": i}
        assert out["artifacts"] == [
            {"name": "tried", "path": "artifacts/tried", "type": "application/octet-stream"}
        ]
    log = (run_dir / "stages" / "s" / "1" / "log").read_text()
    assert log.count("attempt of 1") == 2
    assert "--- chute: attempt 2 at " in log
    check_run_files(run_dir)


def test_show_and_logs_print_the_summary_and_the_stage_log(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "two.yaml",
        pipeline("two", '- {name: one, run: "echo first-line"}\n- {name: two, run: "exit 4"}'),
    )
    chute("run", str(spec))
    shown = chute("show", "latest")
    assert shown.code == 0
    lines = shown.out.splitlines()
    assert lines[0].startswith(f"run {latest(spool).name}  pipeline two  state failed")
    assert lines[1].split() == ["STAGE", "STATE", "ATTEMPTS", "DURATION", "CORES"]
    assert lines[2].split()[:3] == ["one", "succeeded", "1"]
    assert lines[3].split()[:3] == ["two", "failed", "1"]
    assert lines[4].startswith("stages: 1 failed, 1 succeeded; run took ")
    assert "1 failed, 1 succeeded" in lines[4]
    assert "error: stage two failed: exited with code 4" in shown.out
    logs = chute("logs", "latest", "one")
    assert logs.code == 0
    assert logs.out == "first-line\n"
    missing = chute("logs", "latest", "three")
    assert missing.code == 2
    assert "three: no such stage" in missing.err
    assert "one, two" in missing.err


def test_unknown_run_exits_2_and_names_the_closest(spool: Path, chute: Chute) -> None:
    assert chute("run", str(EXAMPLES / "hello.yaml")).code == 0
    real = latest(spool).name
    typo = real[:-1] + ("0" if real[-1] != "0" else "1")
    for verb in ("show", "logs", "retry"):
        done = chute(verb, typo)
        assert done.code == 2, verb
        assert f"{typo}: no such run" in done.err
        assert real in done.err


def test_retry_from_a_stage_keeps_the_earlier_outputs(
    spool: Path, chute: Chute, write_spec: Spec, tmp_path: Path
) -> None:
    log = tmp_path / "ran"
    gate = tmp_path / "gate"
    spec = write_spec(
        "resume.yaml",
        pipeline(
            "resume",
            f"""
- name: extract
  run: |
    echo extract >> {log}; echo '{{"rows": 7}}' > $CHUTE_OUTPUT
- name: load
  inputs: {{rows: extract.rows}}
  run: echo load >> {log}; test -e {gate}
- name: report
  dependsOn: [load]
  run: echo report >> {log}
""",
        ),
    )
    assert chute("run", str(spec)).code == 1
    first = latest(spool).name
    gate.touch()
    done = chute("retry", first)
    assert done.code == 0, done.err
    run_dir = latest(spool)
    rec = load_json(run_dir / "run.json")
    assert rec["resumed_from"] == first
    assert rec["trigger"]["type"] == "retry"
    assert log.read_text().split() == ["extract", "load", "load", "report"]
    assert (run_dir / "stages/extract/output.json").exists()
    check_run_files(run_dir)
    assert chute("retry", run_dir.name, "--from", "extract").code == 0
    assert log.read_text().split()[-3:] == ["extract", "load", "report"]
    bad = chute("retry", run_dir.name, "--from", "nope")
    assert bad.code == 2
    assert "no such stage" in bad.err


def test_sigterm_cancels_the_foreground_run_and_leaves_no_process(
    spool: Path, write_spec: Spec, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    spec = write_spec(
        "long.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: long}\n"
        f"spec:\n  run: 'sleep 1000 & echo $! > {pidfile}; wait'\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "chute", "run", str(spec), "--spool", str(spool)],
        env=chute_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for("the task to start", lambda: pidfile.exists() and pidfile.read_text().strip())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    rec = load_json(latest(spool) / "run.json")
    assert rec["state"] == "cancelled"
    assert stages(latest(spool))["long"]["state"] == "cancelled"
    assert not pid_alive(int(pidfile.read_text()))


def test_invalid_file_exits_2_and_creates_no_run(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "bad.yaml",
        pipeline("bad", '- {name: a, run: "true", dependsOn: [ghost]}'),
    )
    done = chute("run", str(spec))
    assert done.code == 2
    assert "spec.stages[0].dependsOn: unknown stage 'ghost'" in done.err
    assert not (spool / "runs").exists() or not any((spool / "runs").iterdir())


@pytest.mark.parametrize("what", ["spec", "run", "manifest", "output"])
def test_schema_command_prints_a_json_schema(chute: Chute, what: str) -> None:
    import orjson

    done = chute("schema", what)
    assert done.code == 0
    doc = orjson.loads(done.out)
    jsonschema.Draft202012Validator.check_schema(doc)


@pytest.mark.slow
def test_gc_removes_finished_runs_beyond_retention_but_never_latest_or_queued(
    spool: Path, chute: Chute, tmp_path: Path
) -> None:
    config = _config(tmp_path, "retention: {keep_runs: 2, max_age: 30d}")
    for _ in range(5):
        assert chute("run", str(EXAMPLES / "hello.yaml"), "--config", str(config)).code == 0
    ids = sorted(p.name for p in (spool / "runs").iterdir() if not p.is_symlink())
    (spool / "queue").mkdir(exist_ok=True)
    (spool / "queue" / f"{ids[0]}.yaml").write_text("held")  # as if accepted and not done
    done = chute("gc", "--config", str(config))
    assert done.code == 0
    assert done.out.splitlines() == [
        "removed 2 run(s) (keep_runs 2, max_age 30d)",
        "removed 0 pipeline latest link(s) to removed runs",
        "removed 0 rejected file(s) (rejected_max_age 30d)",
        "removed 0 cache entries (cache_max_age 30d, cache_max_size 10GiB)",
    ]
    left = sorted(p.name for p in (spool / "runs").iterdir() if not p.is_symlink())
    assert left == [ids[0], ids[3], ids[4]]
    assert latest(spool).name == ids[4]


def test_gc_removes_a_run_whose_task_nested_folders_thousands_deep(
    spool: Path, chute: Chute, tmp_path: Path, write_spec: Spec
) -> None:
    """Deeper than shutil.rmtree's recursion and PATH_MAX: retention must neither crash
    (the daemon applies it every minute) nor leave the tree behind."""
    config = _config(tmp_path, "retention: {keep_runs: 1, max_age: 30d}")
    once = tmp_path / "nested-once"
    nest = (
        f'[ -e {once} ] && exit 0; touch {once}; {sys.executable} -c "import os\n'
        "for _ in range(3000): os.mkdir('d'); os.chdir('d')\nopen('f', 'w').close()\""
    )
    spec = write_spec(
        "deep.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: deep}\n"
        f"spec:\n  run: {json.dumps(nest)}\n",
    )
    try:
        for _ in range(2):  # the second is the pipeline's latest, which gc keeps
            assert chute("run", str(spec), "--config", str(config)).code == 0
        deep, kept = sorted(p.name for p in (spool / "runs").iterdir() if not p.is_symlink())
        assert (spool / "runs" / deep / "stages" / "deep" / "d" / "d").is_dir()
        done = chute("gc", "--config", str(config))
        assert (done.code, done.err) == (0, "")
        assert done.out.startswith("removed 1 run(s)")
        assert sorted(p.name for p in (spool / "runs").iterdir() if not p.is_symlink()) == [kept]
    finally:  # pytest's clean-up of old temp folders (shutil.rmtree) would choke on it
        subprocess.run(["rm", "-rf", str(spool / "runs")], check=True)


def test_an_artifact_linking_outside_the_run_folder_fails_its_stage(
    spool: Path, chute: Chute, write_spec: Spec
) -> None:
    spec = write_spec(
        "escape.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: sneaky}\n"
        "spec:\n  run: ln -s ../../../../../../../etc/passwd $CHUTE_ARTIFACTS/passwd\n",
    )
    assert chute("run", str(spec)).code == 1
    s = stages(latest(spool))["sneaky"]
    assert s["state"] == "failed"
    assert s["attempts"][0]["error"] == (
        "artifact 'passwd' links outside the run folder (to ../../../../../../../etc/passwd); "
        "write the file into $CHUTE_ARTIFACTS instead of linking to it"
    )
    assert not (latest(spool) / "stages/sneaky/output.json").exists()


def test_gc_keeps_each_pipelines_latest_run(
    spool: Path, chute: Chute, tmp_path: Path, write_spec: Spec
) -> None:
    config = _config(tmp_path, "retention: {keep_runs: 1, max_age: 30d}")
    for name in ("alpha", "beta"):
        spec = write_spec(
            f"{name}.yaml",
            f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  run: 'true'\n",
        )
        assert chute("run", str(spec), "--config", str(config)).code == 0
    done = chute("gc", "--config", str(config))
    assert done.code == 0
    assert done.out.startswith("removed 0 run(s)")
    shown = chute("show", "alpha/latest")
    assert shown.code == 0, shown.err
    assert "alpha" in shown.out


# -- chute run beside a daemon: the daemon's cores stay the daemon's -----------------------------


def _holder(gate: Path, cpus: int) -> str:
    """A job that holds `cpus` cores until `gate` exists."""
    return (
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: holder}\n"
        f"spec:\n  cpus: {cpus}\n  run: 'while ! test -e {gate}; do sleep 0.05; done'\n"
    )


def _running(spool: Path, source: str) -> dict[str, Any] | None:
    recs = [r for r in runs_of(spool, source) if r["state"] == "running"]
    return recs[0] if recs else None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_run_beside_a_daemon_hands_the_run_to_it_and_waits_for_its_cores(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The daemon's two cores are held: `chute run` queues behind the holder instead of
    starting at once on core 0, then prints what `chute submit --wait` prints."""
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 2\n").start()
    drop(spool, "holder.yaml", _holder(gate, 2))
    wait_for("the holder to run", lambda: _running(spool, "incoming/holder.yaml"), 30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chute", "run", str(EXAMPLES / "hello.yaml"), "--spool", str(spool)],
        env=chute_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        queued = wait_for("hello's run", lambda: runs_of(spool, "incoming/hello.yaml"), 30)
        assert queued[0]["state"] == "queued"  # no core is free: it waits its turn
        assert proc.poll() is None
        gate.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    run_id = queued[0]["run_id"]
    assert out.splitlines()[:3] == [
        f"a chute daemon (pid {d.proc.pid}) runs on {spool}: it runs {EXAMPLES / 'hello.yaml'} "  # type: ignore[union-attr]
        "on its cores and this command follows the run (--here runs it in this process instead)",
        f"submitted {EXAMPLES / 'hello.yaml'} as incoming/hello.yaml",
        f"incoming/hello.yaml accepted as run {run_id}",
    ]
    assert f"run {run_id}  pipeline hello  state succeeded  trigger drop" in out
    assert d.stop() == 0


def test_ctrl_c_of_a_run_handed_to_the_daemon_cancels_the_run(
    spool: Path, daemon_factory: Callable[..., Daemon], write_spec: Spec
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    spec = write_spec("long.yaml", "apiVersion: chute/v1\nkind: Job\nmetadata: {name: long}\n"
                      "spec:\n  run: 'sleep 300'\n")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "chute", "run", str(spec), "--spool", str(spool), "-q"],
        env=chute_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run = wait_for("the run to start", lambda: _running(spool, "incoming/long.yaml"), 30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out + err
    assert err == f"{run['run_id']}: cancelling\n"
    assert f"run {run['run_id']}  pipeline long  state cancelled  trigger drop" in out
    assert load_json(spool / "runs" / run["run_id"] / "run.json")["state"] == "cancelled"
    assert d.stop() == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_run_here_beside_a_daemon_runs_in_this_process_on_a_core_the_daemon_does_not_use(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    mask = sorted(os.sched_getaffinity(0))
    d = daemon_factory("cpus: 1\n").start()  # the first core of the mask: the daemon's
    drop(spool, "holder.yaml", _holder(gate, 1))
    wait_for("the holder to run", lambda: _running(spool, "incoming/holder.yaml"), 30)
    done = chute("run", "--here", str(EXAMPLES / "hello.yaml"))
    assert done.code == 0, done.err
    run_dir = latest(spool)
    assert load_json(run_dir / "run.json")["trigger"]["type"] == "run"
    assert stages(run_dir)["hello"]["cores"] == [mask[1]]
    assert f"--here: running on cores {mask[1]}" in done.err
    assert _running(spool, "incoming/holder.yaml")  # it never waited for the daemon
    gate.touch()
    assert d.stop() == 0


def test_run_here_refuses_when_the_daemon_has_every_core_and_a_schedule_is_not_handed_over(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, write_spec: Spec
) -> None:
    d = daemon_factory().start()
    cores = format_cpulist(os.sched_getaffinity(0))
    here = chute("run", "--here", str(EXAMPLES / "hello.yaml"))
    assert (here.code, here.err) == (
        2,
        f"--here: every core chute may use here ({cores}) is the daemon's (pid "
        f"{d.proc.pid}); run without --here to hand the run to the daemon, or leave cores out "  # type: ignore[union-attr]
        "of its cpus: (or reserve_cpus) in its config\n",
    )
    spec = write_spec("tick.yaml", "apiVersion: chute/v1\nkind: Job\nmetadata: {name: tick}\n"
                      "spec:\n  schedule: {every: 1h}\n  run: 'true'\n")  # fmt: skip
    scheduled = chute("run", str(spec))
    assert scheduled.code == 2
    assert scheduled.err.startswith(f"{spec}: has a schedule, and a chute daemon (pid ")
    assert "use `chute submit` to schedule it, or `chute run --here`" in scheduled.err
    assert not os.listdir(spool / "schedules")
    assert runs_of(spool) == []
    assert d.stop() == 0


def test_a_timeout_of_thirty_days_is_a_deadline_not_a_crash(
    chute: Chute, write_spec: Callable[[str, str], Path]
) -> None:
    """epoll takes its wait in int milliseconds (about 24.8 days at most): a wait as long
    as a stage's whole timeout overflowed it."""
    path = write_spec(
        "long.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: long}\nspec:\n"
        "  run: 'sleep 0.2'\n  timeout: 30d\n",
    )
    done = chute("run", str(path))
    assert done.code == 0, done.err
    assert "Traceback" not in done.err
