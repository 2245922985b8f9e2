"""`chute schema spec` and the validator agree on every file, as an editor checks it.

The schema's side is check-jsonschema, the checker editors' CI and pre-commit hooks run: it
reads YAML 1.2 (ruamel.yaml, dates kept as text) and runs patterns as ECMA-262 (regress),
not as Python would. One run of it judges every file of this module (the table below, the
good and bad golden files, the spool's examples).

The table says, for each file, whether both accept it, both refuse it, or only chute can
refuse it: rules a JSON Schema cannot state, listed with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from chute.spec import SpecError, json_schema, load_bytes

HERE = Path(__file__).parent
GOOD = sorted((HERE / "specs" / "good").glob("*.yaml"))
BAD = sorted((HERE / "specs" / "bad").glob("*.yaml"))
# A reader that follows aliases expands this one to 9**9 strings: check-jsonschema never ends
# on it (chute refuses it before expanding anything: tests/test_spec.py).
NOT_FOR_THE_SCHEMA = {"alias_bomb"}
JUDGED = [p for p in BAD if p.stem not in NOT_FOR_THE_SCHEMA]
EXAMPLES = sorted((HERE.parent / "spool" / "examples").glob("*.y*ml"))
NODE = {"node_cpus": 2, "node_memory": 16 << 30}  # as the golden cases


def job(fields: str, *, call: bool = False) -> str:
    """A Job file with `fields` (YAML lines at spec level) after its run or call."""
    what = "call: etl.mes:extract" if call else 'run: "true"'
    lines = "".join(f"  {line}\n" for line in fields.splitlines())
    return f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: x}}\nspec:\n  {what}\n{lines}"


def pipeline(stages: str, fields: str = "") -> str:
    """A Pipeline file: `stages` are YAML lines of the stage list, `fields` spec fields."""
    head = "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: x}\nspec:\n"
    extra = "".join(f"  {line}\n" for line in fields.splitlines())
    listed = "".join(f"    {line}\n" for line in stages.splitlines())
    return f"{head}{extra}  stages:\n{listed}"


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    verdict: str  # "accept": both accept; "refuse": both refuse; "chute": only chute refuses
    why: str = ""  # for "chute": the rule a JSON Schema cannot state


ACCEPT, REFUSE, CHUTE = "accept", "refuse", "chute"

TABLE = [
    # YAML 1.2: only true/false are booleans; yes/no/on/off are strings, keys included
    Case("key_on_is_the_key_on", job("").replace("{name: x}", "{name: x, labels: {on: duty}}"),
         ACCEPT),
    Case("booleans_in_each_yaml12_case", job("cache: True\nfailFast: FALSE"), ACCEPT),
    Case("env_quoted_no", job('env: {COUNTRY: "NO"}'), ACCEPT),
    Case("env_numbers_taken_as_written", job("env: {N: 1_000, T: 1:30, O: 017, E: 1e3}"), ACCEPT),
    Case("stages_named_yes_and_on",
         pipeline("- {name: yes, run: 'true'}\n- {name: on, run: 'true', dependsOn: [yes]}"),
         ACCEPT),
    Case("argv_words_are_strings", job("").replace('run: "true"', "run: [echo, no, off]"), ACCEPT),
    Case("integer_written_as_float", job("cpus: 2.0"), ACCEPT),
    Case("octal_0o", job("priority: 0o17"), ACCEPT),
    Case("exponent_without_point", job("with: {lr: 1e-3, n: 1e3}", call=True), ACCEPT),
    Case("shards_at_the_limit", job("shards: 10000"), ACCEPT),
    # durations and sizes: a unit, and the bounds, as patterns
    Case("sizes_with_units", job('memory: "512MiB"\ndefaults: {memory: 4GiB}'), ACCEPT),
    Case("every_1s", job("schedule: {every: 1s}"), ACCEPT),
    Case("every_1000ms", job("schedule: {every: 1000ms}"), ACCEPT),
    Case("every_0_0167m_is_over_1s", job("schedule: {every: 0.0167m}"), ACCEPT),
    Case("every_0_0000116d_is_over_1s", job("schedule: {every: 0.0000116d}"), ACCEPT),
    Case("timeout_a_microsecond", job("timeout: 0.001ms"), ACCEPT),
    Case("timeout_100_years", job("timeout: 036500d\nretries: {delay: 0s}"), ACCEPT),
    Case("compound_durations", job("timeout: 1h30m\nretries: {delay: 1m30s, maxDelay: 1d12h}"),
         ACCEPT),
    Case("minutes_as_min_and_weeks", job("timeout: 90min\nschedule: {every: 2w}"), ACCEPT),
    Case("every_0m1s", job("schedule: {every: 0m1s}"), ACCEPT),
    Case("every_0s1ms_is_under_1s", job("schedule: {every: 0s999ms}"), REFUSE),
    Case("timeout_compound_at_100_years", job("timeout: 5214w1d23h59m59s999ms"), ACCEPT),
    Case("timeout_compound_100_years_and_1ms", job("timeout: 5214w2d0h0m0s1ms"), REFUSE),
    Case("timeout_compound_zero", job("timeout: 0h0m0s"), REFUSE),
    Case("compound_with_a_space", job("timeout: 2h 30m"), REFUSE),
    Case("compound_part_over_its_place", job("timeout: 1h90m"), REFUSE),
    Case("compound_with_a_fraction", job("timeout: 1.5h30m"), REFUSE),
    Case("compound_smallest_unit_first", job("timeout: 30m1h"), REFUSE),
    Case("cron_lists_ranges_steps_names",
         job("schedule: {cron: '*/15 9-17 1,15,last JAN-jun mon-fri/2'}"), ACCEPT),
    Case("cron_sunday_as_7", job("schedule: {cron: '0 0 * * 7'}"), ACCEPT),
    Case("at_with_lower_case_t_and_z", job("schedule: {at: 2026-12-01t02:00:00z}"), ACCEPT),
    # both refuse
    Case("cache_yes", job("cache: yes"), REFUSE),
    Case("failfast_on", job("failFast: on"), REFUSE),
    Case("cache_y", job("cache: y"), REFUSE),
    Case("memory_without_unit", job("memory: 4096"), REFUSE),
    Case("memory_quoted_without_unit", job('memory: "4096"'), REFUSE),
    Case("timeout_quoted_without_unit", job('timeout: "30"'), REFUSE),
    Case("every_500ms", job("schedule: {every: 500ms}"), REFUSE),
    Case("every_0s", job("schedule: {every: 0s}"), REFUSE),
    Case("every_0_0166m_is_under_1s", job("schedule: {every: 0.0166m}"), REFUSE),
    Case("every_0_0000115d_is_under_1s", job("schedule: {every: 0.0000115d}"), REFUSE),
    Case("timeout_zero", job("timeout: 0.000s"), REFUSE),
    Case("timeout_over_100_years", job("timeout: 36500.001d"), REFUSE),
    Case("duration_in_other_digits", job('timeout: "\u0663s"'), REFUSE),
    Case("duration_with_a_trailing_newline", job('timeout: "30s\\n"'), REFUSE),
    Case("size_unknown_unit", job("memory: 4gb"), REFUSE),
    Case("cron_four_fields", job("schedule: {cron: '0 2 * *'}"), REFUSE),
    Case("cron_minute_61", job("schedule: {cron: '61 2 * * *'}"), REFUSE),
    Case("cron_hour_24", job("schedule: {cron: '0 24 * * *'}"), REFUSE),
    Case("cron_day_32", job("schedule: {cron: '0 0 32 * *'}"), REFUSE),
    Case("cron_step_after_month_names", job("schedule: {cron: '0 0 * jan-jun/2 *'}"), REFUSE),
    Case("cron_weekday_8", job("schedule: {cron: '0 0 * * 8'}"), REFUSE),
    Case("cron_ideographic_space", job('schedule: {cron: "0\u30002 * * *"}'), REFUSE),
    Case("at_month_13", job("schedule: {at: 2026-13-01T00:00:00Z}"), REFUSE),
    Case("at_offset_minute_60", job("schedule: {at: 2026-12-01T02:00:00+08:60}"), REFUSE),
    Case("at_without_offset", job("schedule: {at: 2026-12-01T02:00:00}"), REFUSE),
    Case("misfire_not_a_choice", job("schedule: {every: 1h, misfire: never}"), REFUSE),
    Case("retries_max_101", job("retries: {max: 101}"), REFUSE),
    Case("exit_code_256", job("retries: {onExitCodes: [256]}"), REFUSE),
    Case("cpus_zero", job("cpus: 0"), REFUSE),
    Case("cpus_two_and_a_half", job("cpus: 2.5"), REFUSE),
    Case("shards_10001", job("shards: 10001"), REFUSE),
    Case("name_with_a_trailing_newline", job("").replace("{name: x}", '{name: "x\\n"}'), REFUSE),
    Case("name_1_000", job("").replace("{name: x}", "{name: 1_000}"), REFUSE),
    Case("env_true", job("env: {V: true}"), REFUSE),
    Case("key_twice", job("cpus: 1\ncpus: 2"), REFUSE),
    Case("unknown_field", job("cpu: 1"), REFUSE),
    # only chute: what a JSON Schema cannot state
    Case("env_unquoted_no", job("env: {COUNTRY: NO}"), CHUTE, "unquoted yes/no/on/off"),
    Case("with_unquoted_no", job("with: {dry_run: no}", call=True), CHUTE,
         "unquoted yes/no/on/off"),
    Case("over_unquoted_on", job("shards: {over: [on, off]}"), CHUTE, "unquoted yes/no/on/off"),
    Case("priority_1_000", job("priority: 1_000"), CHUTE, "a number YAML 1.1 reads otherwise"),
    Case("retries_0b11", job("retries: {max: 0b11}"), CHUTE, "a number YAML 1.1 reads otherwise"),
    Case("priority_017", job("priority: 017"), CHUTE, "a number YAML 1.1 reads otherwise"),
    Case("with_infinity", job("with: {x: .inf}", call=True), CHUTE, "a non-finite number"),
    Case("anchor", job("defaults: &d {cpus: 1}"), CHUTE, "anchors and aliases"),
    Case("alias", job("env: &e {A: '1'}\ndefaults: {env: *e}"), CHUTE, "anchors and aliases"),
    Case("cycle",
         pipeline("- {name: a, run: 'true', dependsOn: [b]}\n- {name: b, run: 'true', "
                  "dependsOn: [a]}"), CHUTE, "cycles"),
    Case("unknown_depends_on", pipeline("- {name: a, run: 'true', dependsOn: [c]}"), CHUTE,
         "unknown dependsOn"),
    Case("stage_names_twice", pipeline("- {name: a, run: 'true'}\n- {name: a, run: 'true'}"),
         CHUTE, "stage names unique"),
    Case("cpus_over_the_node", job("cpus: 4"), CHUTE, "the host's CPUs and memory"),
    Case("memory_over_the_node", job("memory: 32GiB"), CHUTE, "the host's CPUs and memory"),
    Case("tasks_over_the_run_limit",
         pipeline("- {name: a, run: 'true', shards: 6000}\n- {name: b, run: 'true', "
                  "shards: 6000}"), CHUTE, "tasks summed over the stages"),
    Case("unknown_time_zone", job("schedule: {cron: '0 2 * * *', timezone: Mars/Olympus}"),
         CHUTE, "a known time zone"),
    Case("at_february_30", job("schedule: {at: 2026-02-30T00:00:00Z}"), CHUTE,
         "a real calendar date"),
    Case("cron_range_backwards", job("schedule: {cron: '30-10 * * * *'}"), CHUTE,
         "a cron range's order and step"),
    Case("cron_step_zero", job("schedule: {cron: '*/0 * * * *'}"), CHUTE,
         "a cron range's order and step"),
    Case("env_value_over_exec_bytes", job("env: {V: " + "\u00e9" * 70_000 + "}"), CHUTE,
         "bytes, not characters, of an argument or NAME=value"),
]  # fmt: skip

# Golden bad files the schema cannot refuse, and why (every other one it must refuse too).
CHUTE_ONLY_GOLDEN = {
    "anchor": "anchors and aliases",
    "bad_timezone": "a known time zone",
    "cycle": "cycles",
    "duplicate_stage_names": "stage names unique",
    "env_yaml11_booleans": "unquoted yes/no/on/off",
    "self_dependency": "cycles",
    "too_many_cpus": "the host's CPUs and memory",
    "too_many_tasks": "tasks summed over the stages",
    "unknown_depends_on": "unknown dependsOn",
    "unknown_input_stage": "unknown inputs stage",
    "with_yaml11_values": "unquoted yes/no/on/off, a number YAML 1.1 reads otherwise",
}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """check-jsonschema's errors for each file (by name), all files in one run."""
    folder = tmp_path_factory.mktemp("agree")
    schema = folder / "spec.schema.json"
    schema.write_text(json.dumps(json_schema()))
    files: list[Path] = []
    for case in TABLE:
        path = folder / f"table-{case.id}.yaml"
        path.write_text(case.text, encoding="utf-8")
        files.append(path)
    for path in GOOD + JUDGED + EXAMPLES:
        copy = folder / f"{path.parent.name}-{path.name}"
        copy.write_bytes(path.read_bytes())
        files.append(copy)
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), "-o", "json"]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    found: dict[str, list[str]] = {f.name: [] for f in files}
    for error in report["errors"] + report["parse_errors"]:
        found[Path(error["filename"]).name].append(error["message"])
    return found


def chute_refuses(text: str | bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    try:
        load_bytes(data, "case.yaml", **NODE)
    except SpecError:
        return True
    return False


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_schema_and_validator_give_the_same_verdict(
    verdicts: dict[str, list[str]], case: Case
) -> None:
    schema_refuses = bool(verdicts[f"table-{case.id}.yaml"])
    expected = {ACCEPT: (False, False), REFUSE: (True, True), CHUTE: (True, False)}
    errors = [e[:200] for e in verdicts[f"table-{case.id}.yaml"]]
    assert (chute_refuses(case.text), schema_refuses) == expected[case.verdict], errors


def test_table_covers_enough_files_and_names_what_only_chute_checks() -> None:
    assert len(TABLE) >= 30
    assert len({c.id for c in TABLE}) == len(TABLE)
    only_chute = {c.why for c in TABLE if c.verdict == CHUTE}
    assert {
        "cycles",
        "unknown dependsOn",
        "the host's CPUs and memory",
        "unquoted yes/no/on/off",
        "anchors and aliases",
    } <= only_chute
    assert all(c.why for c in TABLE if c.verdict == CHUTE)


@pytest.mark.parametrize("path", GOOD + EXAMPLES, ids=[p.stem for p in GOOD + EXAMPLES])
def test_schema_accepts_every_good_file_and_example(
    verdicts: dict[str, list[str]], path: Path
) -> None:
    assert not chute_refuses(path.read_bytes())
    assert verdicts[f"{path.parent.name}-{path.name}"] == []


def test_every_golden_file_the_schema_cannot_judge_exists() -> None:
    assert set(CHUTE_ONLY_GOLDEN) | NOT_FOR_THE_SCHEMA <= {p.stem for p in BAD}


@pytest.mark.parametrize("path", JUDGED, ids=[p.stem for p in JUDGED])
def test_schema_refuses_every_bad_golden_file_it_can_judge(
    verdicts: dict[str, list[str]], path: Path
) -> None:
    assert chute_refuses(path.read_bytes())
    errors = verdicts[f"bad-{path.name}"]
    if path.stem in CHUTE_ONLY_GOLDEN:
        assert errors == [], f"the schema refuses it now: drop {path.stem} from the list"
    else:
        assert errors != []
