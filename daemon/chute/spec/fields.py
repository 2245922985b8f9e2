"""The spec file format, one definition per field: the validator and the JSON Schema both walk it.

Owns: every field's name, type, description and rule (patterns for names, calls and keys;
ranges; enums; "exactly one of"; "only with"), the size limits of one run, and json_schema()
(draft 2020-12) of a whole file, as docs/file-format.md describes it. Not here: the types the
fields are made of (chute.spec.types, chute.spec.scalars, chute.spec.schedule_values),
rules that span fields (stage references, cycles, node limits, MAX_RUN_TASKS summed over
the stages) and the model (chute.spec.validate, chute.spec.model); reading YAML (chute.spec.load).
Crash safety: pure; no I/O.
Limits: the size limits (MAX_SHARDS, MAX_STAGES, MAX_RUN_TASKS, MAX_RETRIES) keep one run's
memory, manifest and loop work bounded: docs/file-format.md (Limits) gives the figures they
were chosen by. A rule with no JSON Schema form is the validator's alone (see the types').
"""

from __future__ import annotations

from typing import Any

from chute import names
from chute.spec.scalars import (
    AbsPath,
    Bool,
    Duration,
    Enum,
    Int,
    JSONValue,
    Size,
    Str,
    Text,
)
from chute.spec.schedule_values import Cron, DateTime, TimeZone
from chute.spec.types import Either, Field, Later, ListOf, MapOf, OneOf, Struct

NAME_PATTERN = f"^{names.NAME_PATTERN}$"
NAME_HINT = names.NAME_HINT
CALL_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
IDENT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME_PATTERN = IDENT_PATTERN
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
INPUT_REF_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
MAX_SHARDS = 10_000
"""Shards of one stage. A shard is a task the daemon holds in memory while its run is active
and an entry of the manifest, which is rewritten while the run runs."""
MAX_RUN_TASKS = 10_000
"""Tasks of one run: each stage counts 1, a sharded stage its shards (fallbacks aside)."""
MAX_STAGES = 1_000
"""Stages of one pipeline."""
MAX_RETRIES = 100
"""`retries.max`: 101 attempts at most (a manifest lists the first and last few of them)."""

# --- the file format (docs/file-format.md), one definition per field ------------------------

_CALL = Str("module.path:function, like etl.mes:extract", CALL_PATTERN)
_RUN = Either(
    "a command string or a non-empty list of argv strings",
    scalar=Text("a command string", allow_empty=False, exec_arg="argument"),
    list_=ListOf(
        Text("an argv string", allow_empty=False, exec_arg="argument"),
        hint="a non-empty list of argv strings",
    ),
)
_WITH = MapOf(
    JSONValue(),
    IDENT_PATTERN,
    "a Python keyword name",
    "a mapping of keyword arguments",
)
_ENV = MapOf(
    Text("a string; quote booleans", exec_arg="variable"),
    ENV_NAME_PATTERN,
    "an environment variable name (letters, digits, '_', not starting with a digit)",
    "a mapping of variable names to strings",
)

_RETRIES_ADVICE = (
    "for a dependency that is down for long, wait longer between tries (a longer delay, "
    "backoff: exponential)"
)
_SHARDS_ADVICE = "give each shard a batch of items, or split the work over several runs"
RETRIES = Struct(
    "retries",
    "How a failed stage is retried.",
    [
        Field(
            "max",
            Int(0, MAX_RETRIES, advice=_RETRIES_ADVICE),
            f"Retries after the first attempt (0: none; at most {MAX_RETRIES}).",
        ),
        Field(
            "backoff",
            Enum("fixed", "exponential"),
            "fixed: wait delay each time; exponential: delay, then 2×, 4×, … capped at maxDelay.",
        ),
        Field("delay", Duration(), "Wait before the first retry, like 2s."),
        Field("maxDelay", Duration(), "Cap on the exponential wait, like 1m."),
        Field(
            "onExitCodes",
            ListOf(Int(0, 255), min_items=1),
            "Retry only these exit codes (absent: every failure is retried).",
        ),
    ],
)

SHARDS = Either(
    f"an integer from 1 to {MAX_SHARDS} or {{over: [items]}}",
    scalar=Int(1, MAX_SHARDS, advice=_SHARDS_ADVICE),
    map_=Struct(
        "shardsOver",
        "One shard per item.",
        [
            Field(
                "over",
                ListOf(
                    JSONValue(),
                    hint="a non-empty list of items",
                    max_items=MAX_SHARDS,
                    noun="items (one shard each)",
                    advice=_SHARDS_ADVICE,
                ),
                f"The items (at most {MAX_SHARDS}); each shard gets one as CHUTE_SHARD_ITEM.",
                required=True,
            )
        ],
    ),
)

_RUN_OR_CALL = OneOf(
    ("run", "call"), "a stage runs one command (run) or one Python callable (call)"
)
_WITH_NEEDS_CALL = {
    "with": (
        "call",
        "goes only with call (keyword arguments of the callable); "
        "pass arguments to a command in run",
    )
}

FALLBACK = Struct(
    "fallback",
    "What runs when the stage fails for good.",
    [
        Field("run", _RUN, "Command: a string runs under /bin/sh -c; a list is argv."),
        Field("call", _CALL, "Python callable, module.path:function."),
        Field("with", _WITH, "Keyword arguments of the callable."),
    ],
    one_of=[OneOf(("run", "call"), "a fallback runs one command (run) or one callable (call)")],
    only_with=_WITH_NEEDS_CALL,
)

SCHEDULE = Struct(
    "schedule",
    "When the file runs again and again (absent: once, now).",
    [
        Field("cron", Cron(), "Five-field cron expression, like '0 2 * * *'."),
        Field("at", DateTime(), "One instant, RFC 3339 with offset: 2026-12-01T02:00:00+08:00."),
        Field(
            "every",
            Duration(minimum=1),
            "A fixed interval of at least 1s, like 15m; the first fire "
            "is one interval after the file is accepted.",
        ),
        Field("timezone", TimeZone(), "IANA zone for cron and run dates (default UTC)."),
        Field(
            "misfire",
            Enum("run_once", "skip"),
            "Fires missed beyond grace: run_once "
            "makes one run for all of them (default), skip drops them.",
        ),
        Field("grace", Duration(), "A fire later than this is a misfire (default 10m)."),
        Field(
            "overlap",
            Enum("skip", "queue", "allow"),
            "When the last run still runs: skip this fire (default), queue one, or allow both.",
        ),
    ],
    one_of=[OneOf(("cron", "at", "every"), "a schedule takes exactly one of cron, at or every")],
)

# Stage fields, in the order messages list them.
_NAME = Field(
    "name", Str(NAME_HINT, NAME_PATTERN), "Stage name, unique in the pipeline.", required=True
)
_STAGE_RUN = Field("run", _RUN, "Command: a string runs under /bin/sh -c; a list is argv.")
_STAGE_CALL = Field("call", _CALL, "Python callable, module.path:function, run in the pool.")
_STAGE_WITH = Field("with", _WITH, "Keyword arguments of the callable.")
_DEPENDS_ON = Field(
    "dependsOn",
    ListOf(Str("a stage name", NAME_PATTERN), min_items=0),
    "Stages that must succeed first.",
)
_INPUTS = Field(
    "inputs",
    MapOf(
        Str("a stage name or stage.field.sub", INPUT_REF_PATTERN),
        IDENT_PATTERN,
        "a Python keyword name",
        "a mapping of keyword to upstream output",
    ),
    "Keyword <- upstream output: 'stage' (its data) or 'stage.field.sub'; implies dependsOn.",
)
_CPUS = Field("cpus", Int(1), "CPU cores the task is pinned to (default 1).")
_MEMORY = Field("memory", Size(), "Memory the task needs, like 4GiB.")
_TIMEOUT = Field("timeout", Duration(positive=True), "Wall-time limit per attempt, like 20m.")
_RETRIES = Field("retries", RETRIES, "How a failed stage is retried.")
_SHARDS = Field(
    "shards",
    SHARDS,
    f"Run N copies, or one per item of {{over: [...]}} (at most {MAX_SHARDS}; and at most "
    f"{MAX_RUN_TASKS} tasks per run, a stage counting its shards).",
)
_CACHE = Field("cache", Bool(), "Skip the stage when its cache key is unchanged.")
_VERSION = Field("version", Text(), "Part of the cache key; bump it to invalidate.")
_FALLBACK = Field("fallback", FALLBACK, "Runs when the stage fails for good.")
_ENV_F = Field("env", _ENV, "Environment variables; merged over the pipeline's.")
_WORKDIR = Field("workdir", AbsPath(), "Working directory (absolute path).")

STAGE_FIELDS = (
    _NAME, _STAGE_RUN, _STAGE_CALL, _STAGE_WITH, _DEPENDS_ON, _INPUTS, _CPUS, _MEMORY,
    _TIMEOUT, _RETRIES, _SHARDS, _CACHE, _VERSION, _FALLBACK, _ENV_F, _WORKDIR,
)  # fmt: skip

STAGE = Struct(
    "stage",
    "One step of a pipeline.",
    STAGE_FIELDS,
    one_of=[_RUN_OR_CALL],
    only_with=_WITH_NEEDS_CALL,
)

DEFAULT_FIELDS = (_CPUS, _MEMORY, _TIMEOUT, _RETRIES, _CACHE, _VERSION, _ENV_F, _WORKDIR)
DEFAULTS = Struct(
    "defaults",
    "Values every stage gets unless it sets its own (retries and env merge key by key).",
    DEFAULT_FIELDS,
)

PIPELINE_FIELDS = (
    Field("schedule", SCHEDULE, "When to run again and again (absent: once, now)."),
    Field("priority", Int(), "Higher goes first (default 0)."),
    Field("failFast", Bool(), "true: a failure cancels the running stages."),
    Field("env", _ENV, "Environment variables of every stage."),
    Field("workdir", AbsPath(), "Working directory of every stage (absolute path)."),
    Field("defaults", DEFAULTS, "Values every stage gets unless it sets its own."),
)

PIPELINE_SPEC = Struct(
    "pipelineSpec",
    "A Pipeline: its stages and how it runs.",
    [
        *PIPELINE_FIELDS,
        Field(
            "stages",
            ListOf(
                STAGE,
                hint="a non-empty list of stages",
                max_items=MAX_STAGES,
                noun="stages",
                advice="split the pipeline into several files",
            ),
            f"The stages (at most {MAX_STAGES}).",
            required=True,
        ),
    ],
)

_NO_STAGES = "use kind: Pipeline for stages"
JOB_SPEC = Struct(
    "jobSpec",
    "A Job: one stage's fields and the pipeline fields side by side.",
    [
        *PIPELINE_FIELDS,
        *(
            f
            for f in STAGE_FIELDS
            if f.name not in {"name", "dependsOn", "inputs", "env", "workdir"}
        ),
    ],
    one_of=[OneOf(("run", "call"), "a Job runs one command (run) or one Python callable (call)")],
    only_with=_WITH_NEEDS_CALL,
    forbidden={
        "stages": f"a Job has one stage; {_NO_STAGES}",
        "name": f"a Job's stage is named after metadata.name; remove it, or {_NO_STAGES}",
        "dependsOn": f"a Job has one stage, so nothing to depend on; {_NO_STAGES}",
        "inputs": f"a Job has no upstream stage to take inputs from; {_NO_STAGES}",
    },
)

METADATA = Struct(
    "metadata",
    "Who the file is.",
    [
        Field(
            "name",
            Str(NAME_HINT, NAME_PATTERN),
            "Name of the job or pipeline, like nightly-etl.",
            required=True,
        ),
        Field(
            "labels",
            MapOf(
                Text("a string; quote booleans"),
                LABEL_KEY_PATTERN,
                "a label key (letters, digits, '.', '_', '/', '-')",
                "a mapping of strings",
            ),
            "Free-form string labels, like {team: data}.",
        ),
    ],
)

API_VERSION = Field("apiVersion", Enum("chute/v1"), "Format version: chute/v1.", required=True)
KIND = Field(
    "kind",
    Enum("Job", "Pipeline"),
    "Job: one command; Pipeline: stages with dependencies.",
    required=True,
)
META = Field("metadata", METADATA, "Name and labels.", required=True)
SPEC = Field("spec", Later(), "What runs and when; its fields depend on kind.", required=True)
FILE = Struct("file", "A chute Job or Pipeline file (apiVersion chute/v1).",
              [API_VERSION, KIND, META, SPEC])  # fmt: skip


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a whole spec file, from the definitions above."""
    defs: dict[str, Any] = {}
    FILE.schema(defs)
    top = defs.pop(FILE.name)
    job = JOB_SPEC.schema(defs)
    pipeline = PIPELINE_SPEC.schema(defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:chute:schema:spec:v1",
        "title": "chute Job or Pipeline file (apiVersion chute/v1)",
        **top,
        "if": {"properties": {"kind": {"const": "Job"}}, "required": ["kind"]},
        "then": {"properties": {"spec": job}},
        "else": {"properties": {"spec": pipeline}},
        "$defs": defs,
    }
