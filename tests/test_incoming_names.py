"""Which names in incoming/ the daemon takes: *.yaml and *.yml in any case run; any other
complete file is rejected with the accepted suffixes; dot-names and temp names wait."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson

from conftest import wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, http_address, job

__all__ = ["daemon_factory"]


def test_spec_suffixes_in_any_case_run_and_other_names_are_rejected_with_the_rule(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("cpus: 1\n").start()
    for name in ("HELLO.YAML", "two.Yml"):
        drop(spool, name, job(name.split(".")[0].lower(), "true"))
    for name in ("hello.json", "hello.txt", "README"):
        drop(spool, name, job("other", "true"))
    for name in (".later.yaml", "later.yaml.part", "LATER.YAML.SWP"):
        drop(spool, name, job("later", "true"))
    for name in ("HELLO.YAML", "two.Yml"):
        assert final_run(spool, f"incoming/{name}")["state"] == "succeeded"
    for name in ("hello.json", "hello.txt", "README"):
        report = spool / "rejected" / f"{name}.error.json"
        wait_for(f"the rejection of {name}", report.exists)
        doc = orjson.loads(report.read_bytes())
        assert (doc["reason"], doc["errors"][0]["message"]) == (
            "not_yaml",
            "is not named *.yaml or *.yml; chute takes spec files with those suffixes (any "
            "case) — rename it, or write it under a dot-name or with .tmp/.part/.swp until it "
            "is complete",
        ), name
    with urllib.request.urlopen(f"http://{http_address(spool)}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'chute_files_rejected_total{reason="not_yaml"} 3.0' in metrics
    assert sorted(p.name for p in (spool / "incoming").iterdir()) == [
        ".later.yaml",
        "LATER.YAML.SWP",
        "later.yaml.part",
    ]
    assert d.stop() == 0
    log = d.log.read_text()
    for name in ("hello.json", "hello.txt", "README"):
        assert f"WARNING incoming/{name} rejected reason=not_yaml: incoming/{name}: is not" in log
