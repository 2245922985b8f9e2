"""Tests of chute.spec: golden bad files, good files, hostile input, the JSON Schema."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chute.spec import Issue, SpecError, json_schema, load_bytes, load_file
from chute.spec.model import Pipeline

HERE = Path(__file__).parent
BAD = sorted((HERE / "specs" / "bad").glob("*.yaml"))
GOOD = sorted((HERE / "specs" / "good").glob("*.yaml"))
EXAMPLES = sorted((HERE.parent / "spool" / "examples").glob("*.y*ml"))
GOLDEN_NODE = {"node_cpus": 2, "node_memory": 16 << 30}  # the node every golden case runs on
FUZZ = settings(  # no example database: a test run leaves no .hypothesis/ behind
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
JOB = b"apiVersion: chute/v1\nkind: Job\nmetadata: {name: x}\nspec:\n  run: echo hi\n"


def errors_of(path: Path, **kw: Any) -> str:
    with pytest.raises(SpecError) as info:
        load_file(path, display_name=path.name, **kw)
    return "\n".join(str(i) for i in info.value.issues)


def issues_or_none(data: bytes) -> list[Issue] | None:
    """The issues of `data`, or None when it is a valid spec; anything else raised fails."""
    try:
        load_bytes(data, "random.yaml")
    except SpecError as e:
        return e.issues
    return None


def elapsed(fn: Any) -> tuple[float, SpecError]:
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        fn()
    return time.perf_counter() - start, info.value


# --- golden files ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_file_gives_its_golden_errors(path: Path) -> None:
    expected = path.with_suffix(".errors").read_text(encoding="utf-8").rstrip("\n")
    assert errors_of(path, **GOLDEN_NODE) == expected


def test_every_bad_case_has_a_golden_file_and_there_are_enough() -> None:
    assert len(BAD) >= 25
    orphans = {p.stem for p in (HERE / "specs" / "bad").glob("*.errors")} - {p.stem for p in BAD}
    assert not orphans


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_good_file_loads_and_returns_its_exact_bytes(path: Path) -> None:
    pipeline, data = load_file(path, **GOLDEN_NODE)
    assert isinstance(pipeline, Pipeline)
    assert data == path.read_bytes()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_spool_example_loads(path: Path) -> None:
    load_file(path)


# --- the model -------------------------------------------------------------------------------


def test_design_example_becomes_the_model_the_engine_expects() -> None:
    p, _ = load_file(HERE / "specs" / "good" / "design_example.yaml")
    assert p.kind == "Pipeline"
    assert p.name == "nightly-etl"
    assert p.labels == {"team": "data"}
    assert [s.name for s in p.stages] == [
        "sap_routing",
        "mes_raw",
        "refresh_metrics",
        "infer",
        "post_check",
    ]
    sap = p.stage("sap_routing")
    assert (sap.cpus, sap.memory, sap.timeout) == (2, 4 << 30, 1200.0)
    assert (sap.retries.max, sap.retries.backoff, sap.retries.delay) == (3, "exponential", 2.0)
    assert (sap.retries.max_delay, sap.retries.on_exit_codes) == (60.0, (75,))
    assert sap.line == 19
    mes = p.stage("mes_raw")
    assert (mes.call, mes.with_, mes.timeout, mes.cpus) == (
        "etl.mes:extract",
        {"plant": "SZ"},
        3600.0,
        1,
    )
    refresh = p.stage("refresh_metrics")
    assert refresh.depends_on == ("sap_routing", "mes_raw")
    assert (refresh.cache, refresh.version) == (True, "2")
    assert p.stage("infer").shards is not None
    assert p.stage("post_check").fallback is not None
    assert p.schedule is not None
    assert (p.schedule.cron, p.schedule.timezone, p.schedule.grace) == (
        "0 2 * * *",
        "Asia/Shanghai",
        3600.0,
    )
    assert all(s.env == {"TZ": "UTC"} and s.workdir == "/srv/etl" for s in p.stages)


def test_stages_come_in_topological_order_with_ties_in_file_order() -> None:
    p, _ = load_file(HERE / "specs" / "good" / "pipeline_shards_defaults.yaml")
    assert [s.name for s in p.stages] == ["prepare", "infer", "report"]


def test_defaults_merge_under_the_stage_and_env_merges_key_by_key() -> None:
    p, _ = load_file(HERE / "specs" / "good" / "pipeline_shards_defaults.yaml")
    infer, report = p.stage("infer"), p.stage("report")
    assert (infer.cpus, report.cpus, infer.timeout) == (2, 1, 1800.0)
    assert (infer.retries.max, infer.retries.backoff, infer.retries.max_delay) == (
        2,
        "exponential",
        10.0,
    )
    assert infer.env == {"MODEL": "vit", "TZ": "Asia/Shanghai"}
    assert report.env == {"MODEL": "resnet", "TZ": "Asia/Shanghai"}
    assert p.env == {"MODEL": "resnet", "TZ": "UTC"}
    assert infer.shards is not None
    assert (infer.shards.count, infer.shards.items) == (3, ("plant-a", "plant-b", {"id": 3}))
    assert report.depends_on == ("infer", "prepare")
    assert report.inputs == {"scores": "infer", "rows": "prepare.rows.count"}


def test_job_is_one_stage_named_after_metadata_name_and_numbers_become_text() -> None:
    p, _ = load_file(HERE / "specs" / "good" / "job_command.yaml")
    assert p.kind == "Job"
    (stage,) = p.stages
    assert stage.name == "backup"
    assert stage.run == ("rsync", "-a", "/srv/data", "/backup")
    assert stage.env == {"DEBUG": "yes", "PORT": "8080"}
    assert p.labels == {"team": "ops", "tier": "1"}
    assert p.schedule is not None
    assert (p.schedule.every, p.schedule.overlap, p.schedule.grace) == (900.0, "queue", 600.0)


def test_at_keeps_its_offset_and_dates_in_with_stay_text() -> None:
    p, _ = load_file(HERE / "specs" / "good" / "job_call_at.yaml")
    assert p.schedule is not None
    assert p.schedule.at is not None
    assert p.schedule.at.isoformat() == "2026-12-31T23:00:00+08:00"
    assert p.stages[0].with_["since"] == "2026-01-01"
    assert p.stages[0].version == "3"


def test_inputs_name_the_longest_stage_prefix_when_names_have_dots() -> None:
    data = (
        b"apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: x}\nspec:\n  stages:\n"
        b"    - {name: a, run: 'true'}\n    - {name: a.b, run: 'true'}\n"
        b"    - {name: c, run: 'true', inputs: {v: a.b.c}}\n"
    )
    assert load_bytes(data, "x.yaml").stage("c").depends_on == ("a.b",)


# --- the file itself -------------------------------------------------------------------------


def test_issue_prints_without_the_parts_that_do_not_apply() -> None:
    assert str(Issue("etl.yaml", 14, "spec.stages[2]", "m")) == "etl.yaml:14: spec.stages[2]: m"
    assert str(Issue("etl.yaml", 3, "", "m")) == "etl.yaml:3: m"
    assert str(Issue("etl.yaml", 0, "", "m")) == "etl.yaml: m"


def test_too_big_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(64 << 20)  # sparse: reading it would be slow, refusing it is not
    took, err = elapsed(lambda: load_file(big, display_name="big.yaml"))
    assert took < 1.0
    assert [str(i) for i in err.issues] == [
        "big.yaml: is 64MiB (67108864 bytes), over the limit of 1MiB (1048576 bytes); "
        "a spec is small — pass big data by reference, or raise max_file_size in the config"
    ]


def test_max_file_size_is_the_callers(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_bytes(JOB)
    with pytest.raises(SpecError, match=r"over the limit of 10B \(10 bytes\)"):
        load_file(f, max_file_size=10)
    assert load_file(f, max_file_size=len(JOB))[1] == JOB


def test_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_bytes(JOB)
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    assert errors_of(tmp_path / "link.yaml") == (
        "link.yaml: is a symbolic link; drop the file itself, not a link to it"
    )


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(errors_of(fifo)), daemon=True)
    worker.start()
    worker.join(timeout=2)
    if worker.is_alive():  # unblock the reader so the thread can end, then fail
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        pytest.fail("load_file blocked on a FIFO")
    assert result == ["pipe.yaml: is a FIFO, not a regular file; drop a YAML file"]


def test_directory_and_missing_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").mkdir()
    assert errors_of(tmp_path / "d.yaml") == (
        "d.yaml: is a directory, not a regular file; drop a YAML file"
    )
    assert errors_of(tmp_path / "gone.yaml") == "gone.yaml: cannot open: No such file or directory"


# --- hostile input: fast, clear, never a crash -----------------------------------------------


def test_deep_nesting_is_refused_before_libyaml_composes_it() -> None:
    data = b"[" * 30_000 + b"]" * 30_000  # composing this with the C loader segfaults
    took, err = elapsed(lambda: load_bytes(data, "deep.yaml"))
    assert took < 1.0
    assert [str(i) for i in err.issues] == [
        "deep.yaml:1: nested deeper than 64 levels; a spec needs far fewer"
    ]


def test_deep_block_nesting_is_refused() -> None:
    data = "".join("  " * i + "-\n" for i in range(5000)).encode()
    took, err = elapsed(lambda: load_bytes(data, "deep.yaml"))
    assert took < 1.0
    assert err.issues[0].message == "nested deeper than 64 levels; a spec needs far fewer"


def test_alias_bomb_is_refused_before_it_expands() -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 30)]
    data = ("\n".join(lines) + "\n").encode()  # 9**30 strings if expanded
    took, err = elapsed(lambda: load_bytes(data, "bomb.yaml"))
    assert took < 1.0
    assert [str(i) for i in err.issues] == [
        "bomb.yaml:1: aliases and anchors are not supported; write the value out"
    ]


def test_many_errors_are_all_reported_sorted_by_line() -> None:
    issues = SpecError([Issue("f", 3, "", "c"), Issue("f", 1, "", "a"), Issue("f", 3, "", "d")])
    assert [i.message for i in issues.issues] == ["a", "c", "d"]


@settings(FUZZ)
@given(st.binary(max_size=2000))
def test_random_bytes_give_a_spec_error_or_a_pipeline(data: bytes) -> None:
    issues = issues_or_none(data)
    if issues is not None:
        assert issues
        assert all(isinstance(i, Issue) and i.file == "random.yaml" for i in issues)


_YAMLISH = st.lists(
    st.sampled_from(
        [
            *"abc01:- \n\t[]{},&*!|>'\"#%@`?~.",
            "\n  ",
            "\n- ",
            ": ",
            "!!",
            "---\n",
            "yes",
            "apiVersion: chute/v1\n",
            "kind: Job\n",
            "spec:\n",
            "  run: x\n",
            "\u00e9",
            "\x07",
        ]
    ),
    max_size=150,
).map("".join)


@settings(FUZZ)
@given(_YAMLISH)
def test_random_yamlish_text_gives_a_spec_error_or_a_pipeline(text: str) -> None:
    assert issues_or_none(text.encode()) != []


_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_FIELDS = st.sampled_from(
    ["run", "call", "with", "cpus", "memory", "timeout", "retries", "shards", "cache",
     "version", "fallback", "env", "workdir", "schedule", "defaults", "stages", "name",
     "dependsOn", "inputs", "priority", "failFast"]
)  # fmt: skip


@settings(FUZZ)
@given(st.sampled_from(["Job", "Pipeline", "Jobb", None]), st.dictionaries(_FIELDS, _VALUES))
def test_random_spec_fields_give_a_spec_error_or_a_pipeline(
    kind: str | None, spec: dict[str, Any]
) -> None:
    doc = {"apiVersion": "chute/v1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    assert issues_or_none(yaml.safe_dump(doc).encode()) != []


# --- YAML 1.2, as editors read it ------------------------------------------------------------


def test_plain_scalars_are_read_by_the_yaml_1_2_core_schema() -> None:
    data = (
        b"apiVersion: chute/v1\nkind: Job\nmetadata: {name: x, labels: {on: duty, off: '1'}}\n"
        b"spec:\n  call: etl.mes:extract\n  cpus: 2.0\n  priority: 0o17\n  with:\n"
        b"    t: True\n    f: FALSE\n    n: ~\n    hex: 0x1F\n    oct: 0o17\n    exp: 1e3\n"
        b"    half: +.5\n    odd_case: tRUE\n    day: 2026-01-01\n    y: y\n    eq: =\n"
        b"    big: 18446744073709551616\n    tagged: !!str yes\n    quoted: 'no'\n"
    )
    p = load_bytes(data, "x.yaml")
    assert p.labels == {"on": "duty", "off": "1"}
    (stage,) = p.stages
    assert (stage.cpus, type(stage.cpus), p.priority) == (2, int, 15)
    assert dict(stage.with_) == {
        "t": True,
        "f": False,
        "n": None,
        "hex": 31,
        "oct": 15,
        "exp": 1000.0,
        "half": 0.5,
        "odd_case": "tRUE",
        "day": "2026-01-01",
        "y": "y",
        "eq": "=",
        "big": 2**64,
        "tagged": "yes",
        "quoted": "no",
    }


def test_a_tag_yaml_1_2_core_lacks_is_refused() -> None:
    data = JOB + b"  version: !!timestamp 2026-01-01\n  priority: !!int 1_000\n"
    with pytest.raises(SpecError) as info:
        load_bytes(data, "x.yaml")
    assert [str(i) for i in info.value.issues] == [
        "x.yaml:6: spec.version: tag !!timestamp is not supported; write a plain value",
        "x.yaml:7: spec.priority: cannot read '1_000' as !!int: not a YAML 1.2 int",
    ]


def test_a_huge_size_or_duration_is_an_error_not_a_crash() -> None:
    nines = "9" * 400
    data = JOB + f"  memory: {nines}B\n  timeout: {nines}d\n".encode()
    with pytest.raises(SpecError) as info:
        load_bytes(data, "x.yaml", node_memory=16 << 30)
    assert [i.message[-60:] for i in info.value.issues] == [
        "ytes) requested; this node has 16GiB — ask for less, or run it on a bigger node"[-60:],
        "99...' is over 36500d (100 years), the longest a duration may be"[-60:],
    ]


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_schema_carries_descriptions_enums_and_the_job_pipeline_split() -> None:
    s = json_schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["additionalProperties"] is False
    stage = s["$defs"]["stage"]
    assert stage["additionalProperties"] is False
    assert stage["properties"]["dependsOn"]["description"]
    assert s["$defs"]["schedule"]["properties"]["misfire"]["enum"] == ["run_once", "skip"]
    assert s["if"] == {"properties": {"kind": {"const": "Job"}}, "required": ["kind"]}
    assert "stages" not in s["$defs"]["jobSpec"]["properties"]
    assert "stages" in s["$defs"]["pipelineSpec"]["required"]
