"""From line-numbered YAML nodes to a Pipeline: the rules that span fields, and the merge.

Owns: choosing the Job or Pipeline form by `kind`; stage names, `dependsOn` and `inputs`
references, cycles, the node's CPU and memory limits; then building the model: defaults
merged into each stage, stages in topological order (ties in file order). Not here: single
fields (chute.spec.fields), reading YAML (chute.spec.load).
Crash safety: pure; no I/O.
Diagnostics: every problem of a file is collected; the model is built only when there are
none, so a SpecError always lists them all.
Size: at most MAX_RUN_TASKS tasks per run, summed over the stages here (fields checks each
stage's shards and the number of stages).
Limits: `inputs: {k: a.b.c}` names the longest prefix that is a stage (stage names may hold
dots), so with stages `a` and `a.b` it means stage `a.b`, field `c`. A cycle is written in run
order, from its first stage in the file: `a -> b -> a` means b runs after a and a after b.
Merging: stage value > `defaults` > built-in default; `retries` and `env` merge key by key
(env: pipeline env, then defaults' env, then the stage's); `workdir`: stage, defaults, spec.
"""

from __future__ import annotations

import heapq
from typing import Any

from chute.spec import fields as F
from chute.spec.load import Issue, Node, SpecError
from chute.spec.model import Fallback, Pipeline, Retries, Schedule, Shards, Stage
from chute.spec.types import Context
from chute.units import format_size, parse_size


def validate(
    root: Node,
    file: str,
    issues: list[Issue],
    *,
    node_cpus: int | None = None,
    node_memory: int | None = None,
) -> Pipeline:
    """The Pipeline in `root`, or SpecError with `issues` and every other problem found."""
    cx = Context(file, list(issues))
    top = F.FILE.check(root, "", cx)
    spec_node: Node | None = top.get("spec")
    kind = top.get("kind")
    if spec_node is None:
        raise SpecError(cx.issues)
    if kind is None:  # missing or wrong: still check the spec, by the form it looks like
        kind = "Pipeline" if "stages" in spec_node.value else "Job"
    meta: dict[str, Any] = top.get("metadata", {})
    if kind == "Job":
        spec = F.JOB_SPEC.check(spec_node, "spec", cx)
        stage_nodes = [spec_node]
        stage_dicts = [spec]
        paths = ["spec"]
    else:
        spec = F.PIPELINE_SPEC.check(spec_node, "spec", cx)
        stages_node = spec_node.value.get("stages")
        stage_nodes = stages_node.value if stages_node is not None and stages_node.is_list else []
        stage_dicts = list(spec.get("stages", []))
        paths = [f"spec.stages[{i}]" for i in range(len(stage_nodes))]
    defaults: dict[str, Any] = spec.get("defaults", {})

    order = _check_graph(spec_node, stage_nodes, stage_dicts, paths, cx) if kind != "Job" else [0]
    if kind != "Job":
        _check_run_tasks(spec_node, stage_dicts, cx)
    _check_node_limits(spec_node, stage_nodes, stage_dicts, paths, cx, node_cpus, node_memory)
    if cx.issues:
        raise SpecError(cx.issues)

    if kind == "Job":
        stage_dicts = [{**spec, "name": meta["name"]}]
    built = [
        _build_stage(stage_dicts[i], stage_nodes[i].line, spec, defaults, _deps(stage_dicts[i]))
        for i in order
    ]
    for i, stage in zip(order, built, strict=True):
        size = _exec_bytes(stage)
        if size > EXEC_BUDGET:
            cx.report(
                stage_nodes[i].line,
                paths[i],
                f"its command and environment come to {format_size(size)}; a program starts "
                f"with at most {format_size(EXEC_BUDGET)} of both (the kernel's 2MiB ARG_MAX, "
                "less room for chute's own variables) — put the data in a file and pass its path",
            )
    if cx.issues:
        raise SpecError(cx.issues)
    return Pipeline(
        kind=kind,
        name=meta["name"],
        stages=tuple(built),
        labels=meta.get("labels", {}),
        schedule=_build_schedule(spec["schedule"]) if "schedule" in spec else None,
        priority=spec.get("priority", 0),
        fail_fast=spec.get("failFast", False),
        env=spec.get("env", {}),
        workdir=spec.get("workdir"),
    )


def _resolve_ref(ref: str, names: set[str]) -> str | None:
    """The stage an `inputs` reference names: the longest dotted prefix that is a stage."""
    parts = ref.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in names:
            return candidate
    return None


def _deps(stage: dict[str, Any]) -> tuple[str, ...]:
    deps = [d for d in stage.get("dependsOn", []) if isinstance(d, str)]
    deps += stage.get("_input_stages", [])
    return tuple(dict.fromkeys(deps))


def _check_graph(
    spec_node: Node,
    stage_nodes: list[Node],
    stages: list[Any],
    paths: list[str],
    cx: Context,
) -> list[int]:
    """Names, references and cycles; returns the stage indexes in topological order."""
    index: dict[str, int] = {}
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not isinstance(st.get("name"), str):
            continue
        name = st["name"]
        if name in index:
            first = stage_nodes[index[name]].line
            cx.report(
                stage_nodes[i].key_lines["name"],
                f"{paths[i]}.name",
                f"{name!r} is already the name of spec.stages[{index[name]}] (line {first}); "
                "stage names must be unique",
            )
        else:
            index[name] = i
    listing = ", ".join(index)
    names = set(index)

    edges: dict[int, list[int]] = {i: [] for i in range(len(stages))}  # upstream -> downstream
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            continue
        node: dict[str, Node] = stage_nodes[i].value
        deps = st.get("dependsOn", [])
        for j, dep in enumerate(deps):
            if not isinstance(dep, str):
                continue
            if dep not in names:
                cx.report(
                    node["dependsOn"].value[j].line,
                    f"{paths[i]}.dependsOn",
                    f"unknown stage {dep!r} (stages are: {listing})",
                )
            else:
                edges[index[dep]].append(i)
        implied: list[str] = []
        for kwarg, ref in st.get("inputs", {}).items():
            target = _resolve_ref(ref, names)
            if target is None:
                cx.report(
                    node["inputs"].value[kwarg].line,
                    f"{paths[i]}.inputs.{kwarg}",
                    f"unknown stage in {ref!r} (stages are: {listing}); "
                    "write 'stage' or 'stage.field'",
                )
            else:
                implied.append(target)
                edges[index[target]].append(i)
        st["_input_stages"] = implied

    cycles = _cycles(edges, stages)
    for cycle in cycles:
        cx.report(
            spec_node.key_lines.get("stages", spec_node.line),
            "spec.stages",
            "dependency cycle " + " -> ".join(cycle),
        )
    if cycles:
        return list(range(len(stages)))

    indegree = dict.fromkeys(edges, 0)
    for i in edges:
        for j in edges[i]:
            indegree[j] += 1
    ready = [i for i, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in edges[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, j)
    return order


def _cycles(edges: dict[int, list[int]], stages: list[Any]) -> list[list[str]]:
    """Each cycle found by a depth-first search in file order, named in run order."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(edges, white)
    found: list[list[str]] = []
    seen: set[frozenset[int]] = set()

    def name(i: int) -> str:
        return str(stages[i].get("name", f"stages[{i}]"))

    for start in edges:
        if color[start] != white:
            continue
        stack: list[tuple[int, int]] = [(start, 0)]
        path: list[int] = [start]
        color[start] = grey
        while stack:
            node, k = stack[-1]
            if k < len(edges[node]):
                stack[-1] = (node, k + 1)
                nxt = edges[node][k]
                if color[nxt] == white:
                    color[nxt] = grey
                    stack.append((nxt, 0))
                    path.append(nxt)
                elif color[nxt] == grey:
                    loop = path[path.index(nxt) :]
                    key = frozenset(loop)
                    if key not in seen:
                        seen.add(key)
                        first = loop.index(min(loop))
                        loop = loop[first:] + loop[:first]
                        found.append([name(i) for i in [*loop, loop[0]]])
            else:
                color[node] = black
                stack.pop()
                path.pop()
    return found


def _tasks(stage: Any) -> int:
    """The tasks a stage makes: its shards, else 1."""
    shards = stage.get("shards") if isinstance(stage, dict) else None
    if isinstance(shards, int):
        return shards
    if isinstance(shards, dict) and isinstance(shards.get("over"), list):
        return len(shards["over"])
    return 1


def _check_run_tasks(spec_node: Node, stages: list[Any], cx: Context) -> None:
    """MAX_RUN_TASKS over all stages (each one's shards are checked on their own)."""
    total = sum(_tasks(st) for st in stages)
    if total > F.MAX_RUN_TASKS:
        cx.report(
            spec_node.key_lines.get("stages", spec_node.line),
            "spec.stages",
            f"{total} tasks in all (a stage counts 1, a sharded stage its shards); at most "
            f"{F.MAX_RUN_TASKS} per run — give each shard a batch of items, or split the work "
            "over several runs",
        )


def _check_node_limits(
    spec_node: Node,
    stage_nodes: list[Node],
    stages: list[Any],
    paths: list[str],
    cx: Context,
    node_cpus: int | None,
    node_memory: int | None,
) -> None:
    places: list[tuple[Node, str, Any]] = []
    defaults_node = spec_node.value.get("defaults")
    if defaults_node is not None and defaults_node.is_map:
        places.append((defaults_node, "spec.defaults", None))
    places += [(stage_nodes[i], paths[i], None) for i in range(len(stage_nodes))]
    for node, path, _ in places:
        if not node.is_map:
            continue
        cpus = node.value.get("cpus")
        if (
            node_cpus is not None
            and cpus is not None
            and type(cpus.value) is int
            and cpus.value > node_cpus
        ):
            cx.report(
                cpus.line,
                f"{path}.cpus",
                f"{cpus.value} CPUs requested; this node has {node_cpus} — "
                "ask for fewer, or run it on a bigger node",
            )
        memory = node.value.get("memory")
        if node_memory is not None and memory is not None and isinstance(memory.value, str):
            try:
                asked = parse_size(memory.value)
            except ValueError:
                continue
            if asked > node_memory:
                cx.report(
                    memory.line,
                    f"{path}.memory",
                    f"{format_size(asked)} requested; this node has {format_size(node_memory)} "
                    "— ask for less, or run it on a bigger node",
                )


EXEC_BUDGET = (2 << 20) - (64 << 10)
"""Bytes of command and environment a stage may have: the kernel's usual ARG_MAX (2 MiB,
a quarter of the default 8 MiB stack), less room for what chute adds (PATH, HOME, LANG,
the CHUTE_ variables and the pointers to all of them)."""


def _exec_bytes(stage: Stage) -> int:
    """Bytes of the strings a stage's program is started with (each with its NUL)."""
    env = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in stage.env.items())
    commands = [c for c in (stage.run, stage.fallback.run if stage.fallback else None) if c]
    argv = max(
        (sum(len(a.encode()) + 1 for a in ((c,) if isinstance(c, str) else c)) for c in commands),
        default=0,
    )
    return env + argv


def _command(value: Any) -> str | tuple[str, ...] | None:
    if isinstance(value, list):
        return tuple(value)
    return value if isinstance(value, str) else None


def _build_stage(
    st: dict[str, Any],
    line: int,
    spec: dict[str, Any],
    defaults: dict[str, Any],
    depends_on: tuple[str, ...],
) -> Stage:
    def pick(key: str, default: Any) -> Any:
        return st.get(key, defaults.get(key, default))

    retries = {**defaults.get("retries", {}), **st.get("retries", {})}
    shards = st.get("shards")
    fallback = st.get("fallback")
    return Stage(
        name=st["name"],
        run=_command(st.get("run")),
        call=st.get("call"),
        with_=st.get("with", {}),
        depends_on=depends_on,
        inputs=st.get("inputs", {}),
        cpus=pick("cpus", 1),
        memory=pick("memory", 0),
        timeout=pick("timeout", None),
        retries=Retries(
            max=retries.get("max", 0),
            backoff=retries.get("backoff", "fixed"),
            delay=retries.get("delay", 1.0),
            max_delay=retries.get("maxDelay"),
            on_exit_codes=tuple(retries.get("onExitCodes", ())),
        ),
        shards=(
            None
            if shards is None
            else Shards(count=shards)
            if isinstance(shards, int)
            else Shards(count=len(shards["over"]), items=tuple(shards["over"]))
        ),
        cache=pick("cache", False),
        version=pick("version", ""),
        fallback=(
            None
            if fallback is None
            else Fallback(
                run=_command(fallback.get("run")),
                call=fallback.get("call"),
                with_=fallback.get("with", {}),
            )
        ),
        env={**spec.get("env", {}), **defaults.get("env", {}), **st.get("env", {})},
        workdir=st.get("workdir", defaults.get("workdir", spec.get("workdir"))),
        line=line,
    )


def _build_schedule(s: dict[str, Any]) -> Schedule:
    return Schedule(
        cron=s.get("cron"),
        at=s.get("at"),
        every=s.get("every"),
        timezone=s.get("timezone", "UTC"),
        misfire=s.get("misfire", "run_once"),
        grace=s.get("grace", 600.0),
        overlap=s.get("overlap", "skip"),
    )
