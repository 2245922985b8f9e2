"""The documentation a user reads: every link in it resolves inside the repository, the
product never points outside it, and the commands the README and docs/cli.md show run.

Commands run from blocks marked for it, on a temporary copy of the repository's spool/, as a
user types them (`chute` on PATH, the working directory holding `spool/`):

    <!-- doc-test -->            each command of the next ```sh block must exit 0 (or the N of a
                                 trailing `# exits N` comment) and print something on stdout
    <!-- doc-test: daemon -->    the next block's `chute daemon ...` (after any `&&` install
                                 steps before it) is started and left running for the blocks
                                 that follow; it must stop cleanly on SIGTERM at the end
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, chute_env

PRODUCT = ("README.md", "docs", "systemd", "spool", "daemon", "grafana", "pyproject.toml")
"""What ships to users: none of it may point at files outside the repository."""
OUTSIDE = re.compile(r"\.\./shared|\bDESIGN\b")


def repo_files() -> list[Path]:
    """The repository's files: tracked, or new and not ignored (git), else every file
    outside the folders tools make."""
    if (REPO / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return sorted({REPO / p for p in listed.split("\0") if p and (REPO / p).is_file()})
    skip = {".git", ".venv", "__pycache__", "build", ".mypy_cache", ".ruff_cache"}
    return sorted(
        p
        for p in REPO.rglob("*")
        if p.is_file() and not any(part in skip or part.endswith(".egg-info") for part in p.parts)
    )


def markdown_files() -> list[Path]:
    return [p for p in repo_files() if p.suffix == ".md"]


# -- markdown, as GitHub renders it -------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the text outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces to
    hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = LINK.sub(lambda m: m.group(1), text)
    text = re.sub(r"[*_]{2,}|(?<!\w)[*_]|[*_](?!\w)", "", text)  # emphasis, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in prose_lines(path.read_text()):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, m.group(2)


def test_every_relative_link_and_anchor_in_the_markdown_resolves_inside_the_repository() -> None:
    files = markdown_files()
    assert REPO / "README.md" in files
    assert REPO / "docs" / "file-format.md" in files
    broken: list[str] = []
    for md in files:
        where = md.relative_to(REPO)
        for number, target in links(md):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            ref, _, anchor = target.partition("#")
            dest = (md.parent / ref).resolve() if ref else md
            if not dest.is_relative_to(REPO.resolve()):
                broken.append(f"{where}:{number}: {target}: outside the repository")
            elif not dest.exists():
                broken.append(f"{where}:{number}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                known = ", ".join(sorted(anchors(dest)))
                broken.append(f"{where}:{number}: {target}: no heading #{anchor} ({known})")
            elif anchor and dest.suffix != ".md":
                broken.append(f"{where}:{number}: {target}: an anchor into a non-markdown file")
    assert broken == []


def test_github_anchors_are_computed_as_github_makes_them() -> None:
    # The checker above is only as good as its slugs: cases from these docs' own headings.
    assert slug("`$CHUTE_INPUTS` and `inputs:`") == "chute_inputs-and-inputs"
    assert slug("Values: durations, sizes and YAML 1.2") == "values-durations-sizes-and-yaml-12"
    assert slug("Reloading (SIGHUP)") == "reloading-sighup"
    assert slug("run.json") == "runjson"
    assert slug("cpus, reserve_cpus, memory") == "cpus-reserve_cpus-memory"
    assert slug("**Bold** [link](x.md)") == "bold-link"


def test_no_file_of_the_product_points_outside_the_repository() -> None:
    offenders: list[str] = []
    for path in repo_files():
        rel = path.relative_to(REPO)
        if rel.parts[0] not in PRODUCT:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []


# -- the commands the docs show -----------------------------------------------------------------

MARK = re.compile(r"^<!--\s*doc-test(?::\s*(\w+))?\s*-->\s*$")
EXITS = re.compile(r"#.*\bexits (\d+)")


@dataclass(frozen=True)
class Block:
    kind: str  # "commands" or "daemon"
    line: int
    commands: tuple[str, ...]


def marked_blocks(path: Path) -> list[Block]:
    """The shell blocks of `path` marked for this test, in document order."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    for i, line in enumerate(lines):
        m = MARK.match(line)
        if not m:
            continue
        kind = "daemon" if m.group(1) == "daemon" else "commands"
        assert m.group(1) in (None, "daemon"), f"{path.name}:{i + 1}: unknown mark {line!r}"
        start = i + 1
        assert lines[start].startswith("```sh"), f"{path.name}:{i + 1}: no ```sh block after it"
        end = next(j for j in range(start + 1, len(lines)) if lines[j].startswith("```"))
        commands: list[str] = []
        pending = ""
        for text in lines[start + 1 : end]:
            if text.rstrip().endswith("\\"):
                pending += text.rstrip()[:-1] + " "
                continue
            text = pending + text
            pending = ""
            if text.strip() and not text.lstrip().startswith("#"):
                commands.append(text.strip())
        blocks.append(Block(kind, start + 1, tuple(commands)))
    return blocks


class DocDaemon:
    """The daemon a doc starts, started with that doc's command; READY=1 over a notify
    socket says when it is up."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.sock_path = str(cwd / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.settimeout(0.1)
        self.log = cwd / "daemon.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {command}"],
                cwd=cwd,
                env={**env, "NOTIFY_SOCKET": self.sock_path},
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return
            except TimeoutError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"`{command}` did not become ready:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def daemon_command(block: Block) -> str:
    """`chute daemon ...` of a daemon block: its one command, after the install steps a
    quickstart chains before it with `&&`."""
    assert len(block.commands) == 1, block
    command = block.commands[0].split("&&")[-1].strip()
    assert command.startswith("chute daemon"), block
    return command


@pytest.mark.parametrize("doc", ["README.md", pytest.param("docs/cli.md", marks=pytest.mark.slow)])
def test_every_command_the_doc_shows_runs_and_prints_something(doc: str, tmp_path: Path) -> None:
    blocks = marked_blocks(REPO / doc)
    assert any(b.kind == "commands" for b in blocks), f"{doc}: no block marked doc-test"
    shutil.copytree(
        REPO / "spool",
        tmp_path / "spool",
        ignore=lambda folder, names: (
            []
            if Path(folder) != REPO / "spool"
            else [n for n in names if n not in ("examples", "README.md")]
        ),
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chute").write_text(f'#!/bin/sh\nexec {sys.executable} -m chute "$@"\n')
    (bin_dir / "chute").chmod(0o755)
    config = tmp_path / "chute.yaml"
    config.write_text("http: {listen: '127.0.0.1:0'}\n")  # tests run side by side
    env = chute_env(
        {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CHUTE_CONFIG": str(config)}
    )
    daemon: DocDaemon | None = None
    try:
        for block in blocks:
            if block.kind == "daemon":
                assert daemon is None, f"{doc}:{block.line}: a second daemon"
                daemon = DocDaemon(daemon_command(block), tmp_path, env)
                continue
            for command in block.commands:
                expected = EXITS.search(command)
                done = subprocess.run(
                    ["bash", "-c", command],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                where = f"{doc}:{block.line}: {command}"
                assert done.returncode == (int(expected.group(1)) if expected else 0), (
                    where,
                    done.stdout,
                    done.stderr,
                )
                assert done.stdout.strip(), (where, "printed nothing", done.stderr)
                assert "Traceback" not in done.stderr, (where, done.stderr)
        if daemon is not None:
            assert daemon.stop() == 0, daemon.log.read_text()
            daemon = None
    finally:
        if daemon is not None:
            daemon.close()


def test_the_readme_shows_the_stage_log_and_the_report_of_a_run() -> None:
    """The quickstart's own promises: a stage that prints, and report.html in the listing."""
    readme = (REPO / "README.md").read_text()
    assert "chute logs latest raw_orders --spool spool" in readme
    assert re.search(r"ls spool/runs/latest/ +# .*report\.html", readme)
    etl = (REPO / "spool" / "examples" / "etl.yaml").read_text()
    raw_orders = etl.split("- name: raw_orders", 1)[1].split("- name:", 1)[0]
    assert re.search(r"^\s+echo ", raw_orders, re.M), "raw_orders must print to its log"
    quickstart = marked_blocks(REPO / "README.md")[0]
    assert quickstart.kind == "daemon"
    assert "pip install . &&" in quickstart.commands[0], "the daemon needs no test extras"
